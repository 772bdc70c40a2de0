"""refdiff.likelihood's two routes to the trace: v^T J v by forward mode (score_fn.jvp) and
v^T (J^T v) by the model's backward pass (score_fn.vjp) are one number.

The two routes compute the same bilinear form by different sequences of float operations, so
they agree to rounding, not bit for bit. The tolerance is derived from the routes' own
rounding: the same networks in float32 give the forward-mode trace an error
err32 = max |q_jvp(float32) - q_jvp(float64)| against float64; the float32 VJP must be
within 4 err32 of the float64 JVP (the project's check_op slack: 4 x the float32 error of
the reference; floor below), and in float64 the two routes must agree within 4 err32 scaled by the ratio
of the unit roundoffs (2^-52 / 2^-23): the same error budget one precision down, but never
below the rounding of the last reduction q = sum_i v_i (J v)_i itself, 16 ulps of
sum_i |v_i (J v)_i| (as tests/helpers.py's assert_zero; a float32 run can land within one ulp
of float64 by chance, which would make the rescaled bound smaller than that). A wrong
transpose, a wrong conversion coefficient or a missing term would be off by O(|q|).
"""
import numpy as np
import pytest

from refdiff import likelihood as L
from refdiff.ddpm import schedule_from_meta
from refdiff.nn.mlp import ScoreMLP
from refdiff.nn.unet_ddpm import UNetDDPM
from refdiff.prediction import EpsModel
from refdiff.sde import VP

TINY = dict(in_channels=1, image_size=8, channels=(4, 8), blocks=1, attention=(1,), heads=2, num_classes=3,
            dropout=0.1, max_groups=2, time_scale=10.0, zero_init=False)
ULP_RATIO = np.finfo(np.float64).eps / np.finfo(np.float32).eps


def _unet_ddpm(dtype, pred):
    """The tiny class-conditional v- (or eps-) network of tests/test_unet_ddpm.py, seen as an
    eps-model through its null label; norms moved away from (1, 0) so that every path counts."""
    net = UNetDDPM(dtype=dtype, seed=3, **TINY)
    rng = np.random.default_rng(3)
    for k in net.params:
        if ".norm" in k:
            net.params[k][...] = (k.endswith(".weight")) + 0.5 * rng.standard_normal(net.params[k].shape)
    return EpsModel(net, pred, schedule_from_meta({}))


def _mlp(dtype, pred=None):
    return ScoreMLP(dim=6, widths=(16, 16), dtype=dtype, seed=0)


def _traces(make, pred, x, t, probes):
    """(float64 JVP, float64 VJP, float32 JVP, float32 VJP) Hutchinson traces (B,), and the
    scale of the float64 JVP trace's terms, sum_i |v_i (J v)_i| averaged over the probes (B,)."""
    out = []
    for dtype in (np.float64, np.float32):
        sf = L.model_score(make(dtype, pred), VP())
        for route in ("jvp", "vjp"):
            s, tr = L.divergence_hutchinson(sf, x, t, probes, route=route)
            out.append(tr)
        if dtype == np.float64:
            P, B = probes.shape[:2]
            _, jv = sf.jvp(np.tile(x, (P,) + (1,) * (x.ndim - 1)), np.tile(t, P), probes.reshape((P * B,) + x.shape[1:]))
            scale = np.abs(jv * probes.reshape(jv.shape)).reshape(P, B, -1).sum(axis=2).mean(axis=0)
    return out + [scale]


@pytest.mark.parametrize("make,pred,shape", [(_unet_ddpm, "v", (1, 8, 8)), (_unet_ddpm, "eps", (1, 8, 8)),
                                             (_mlp, None, (6,))], ids=["unet-ddpm-v", "unet-ddpm-eps", "mlp"])
def test_vjp_trace_equals_jvp_trace(make, pred, shape):
    rng = np.random.default_rng(0)
    B = 3
    x, t = rng.standard_normal((B,) + shape), rng.uniform(0.05, 1.0, B)
    probes = L.sample_probes((2, B) + shape, rng)                       # the same probes for both routes
    q64_jvp, q64_vjp, q32_jvp, q32_vjp, scale = _traces(make, pred, x, t, probes)
    err32 = np.max(np.abs(q32_jvp - q64_jvp))
    assert err32 > 0                                                    # float32 did round: the bound is not 0
    assert np.all(np.abs(q32_vjp - q64_jvp) <= np.maximum(4 * err32, 16 * np.finfo(np.float32).eps * scale))
    tol64 = np.maximum(4 * err32 * ULP_RATIO, 16 * np.finfo(np.float64).eps * scale)
    assert np.all(np.abs(q64_vjp - q64_jvp) <= tol64)
    assert np.min(np.abs(q64_jvp)) > 1e3 * err32                        # the traces are far from 0: a real test


def test_exact_divergence_by_either_route():
    # e_i^T J e_i = e_i^T J^T e_i: the exact trace of a float64 MLP by both routes, to float64
    # rounding of a sum of D = 6 terms of size |J| (16 ulps of the sum of |diagonal|, as assert_zero).
    sf = L.model_score(_mlp(np.float64), VP())
    x = np.random.default_rng(1).standard_normal((4, 6))
    s1, tr_j = L.divergence_exact(sf, x, 0.3, route="jvp")
    s2, tr_v = L.divergence_exact(sf, x, 0.3, route="vjp")
    _, jv = sf.jvp(np.repeat(x, 6, axis=0), np.full(24, 0.3), np.tile(np.eye(6), (4, 1)))
    scale = np.abs(jv.reshape(4, 6, 6)).sum(axis=(1, 2))
    assert np.all(np.abs(tr_v - tr_j) <= 16 * np.finfo(np.float64).eps * scale)
    np.testing.assert_array_equal(s1, s2)


def test_auto_route_and_what_it_leaves_behind():
    model = _unet_ddpm(np.float64, "v")
    sf = L.model_score(model, VP())
    assert L.resolve_route(sf) == "vjp" and L.resolve_route(sf, "jvp") == "jvp"
    x = np.random.default_rng(2).standard_normal((2, 1, 8, 8))
    L.divergence_hutchinson(sf, x, 0.5, L.sample_probes((1, 2, 1, 8, 8), np.random.default_rng(3)))
    assert all(not np.any(g) for g in model.net.grads.values())       # the backward's gradients were zeroed
    with pytest.raises(ValueError, match="route"):
        L.resolve_route(sf, "reverse")
    with pytest.raises(ValueError, match="vjp"):                       # a score with only a JVP, asked for a VJP
        L.resolve_route(type("S", (), {"jvp": staticmethod(sf.jvp)})(), "vjp")


def test_log_likelihood_same_by_either_route():
    # The whole ODE solve: the products differ by float64 rounding only, far below RK45's
    # tolerance (1e-4), so the step sequence is the same and the results agree within 1e-6.
    sde, rng = VP(), np.random.default_rng(5)
    sf = L.model_score(_mlp(np.float64), sde)
    x = rng.standard_normal((4, 6))
    a, na = L.log_likelihood(sde, sf, x, np.random.default_rng(6), rtol=1e-4, atol=1e-4, route="jvp")
    b, nb = L.log_likelihood(sde, sf, x, np.random.default_rng(6), rtol=1e-4, atol=1e-4, route="vjp")
    assert na == nb
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
