"""refdiff.losses.ssm_fd by value against a hand computation, with a network linear in x
(eps(x, t) = A x + t b, so the central differences are exact): the 2R rows it evaluates are
x_t +- h nu with h = fd_step std_t / sqrt(D) for (B, D) and (B, C, H, W) data and both kinds of
probe, the loss is T sum_r w_r / R (first_r - 2 std_r nu_r^T A nu_r) with first = (nu^T eps)^2
or |eps|^2 (variance-reduced), the gradient handed back is that loss's, and ssm_vr / ssm_vr_fd
are ssm / ssm_fd with variance_reduced=True and the caller's other options."""
import math

import numpy as np
import pytest

from refdiff import losses
from refdiff.backend import REFERENCE
from refdiff.nn.mlp import ScoreMLP
from refdiff.sde import VP


class Linear:
    """eps(x, t) = A vec(x) + t b, recording its input and the gradient it is given."""

    kind, name, ops, dtype = "eps", "linear", REFERENCE, np.dtype(np.float64)

    def __init__(self, D, seed=0):
        r = np.random.default_rng(seed)
        self.A, self.b = r.standard_normal((D, D)) / math.sqrt(D), r.standard_normal(D)

    def forward(self, x, t):
        self.x = x.copy()
        flat = x.reshape(x.shape[0], -1)
        return (flat @ self.A.T + t[:, None] * self.b).reshape(x.shape)

    def backward(self, dy):
        self.dy = dy.copy()


def _by_hand(net, sde, xt, t, std, w, nu, variance_reduced):
    """The rows' terms of a network linear in x, eps = A x + t b, flattened: -> (eps, nu, nu^T eps,
    c = T w / R, loss = sum_r c_r (first_r - 2 std_r nu_r^T A nu_r))."""
    R = xt.shape[0]
    eps = xt.reshape(R, -1) @ net.A.T + t[:, None] * net.b
    n = nu.reshape(R, -1)
    proj = np.sum(n * eps, axis=1)
    first = np.sum(eps * eps, axis=1) if variance_reduced else proj ** 2
    c = sde.T * w / R
    return eps, n, proj, c, float(np.sum(c * (first - 2 * std * np.einsum("rd,de,re->r", n, net.A, n))))


@pytest.mark.parametrize("shape", [(3, 4), (2, 1, 2, 3)])
@pytest.mark.parametrize("projection", ["rademacher", "gaussian"])
@pytest.mark.parametrize("variance_reduced, weighting", [(False, "noise"), (True, "likelihood"), (False, "none")])
def test_ssm_fd_against_the_hand_computation(shape, projection, variance_reduced, weighting):
    sde = VP(0.1, 20.0, T=2.0)
    D = int(np.prod(shape[1:]))
    x0 = np.random.default_rng(1).uniform(-1, 1, shape)
    net, fd_step, P = Linear(D), 0.05, 2
    kw = dict(projection=projection, n_projections=P, t_min=1e-3, weighting=weighting)
    loss = losses.ssm_fd(net, sde, x0, np.random.default_rng(7), variance_reduced=variance_reduced,
                         fd_step=fd_step, **kw)
    xt, t, std, w, nu = losses._ssm_batch(sde, x0, np.random.default_rng(7), projection, P, 1e-3, weighting)
    h = fd_step * std / math.sqrt(D)
    step = h.reshape((-1,) + (1,) * (xt.ndim - 1)) * nu
    np.testing.assert_allclose(net.x, np.concatenate([xt + step, xt - step]), rtol=1e-13, atol=1e-15)
    eps, n, proj, c, want_loss = _by_hand(net, sde, xt, t, std, w, nu, variance_reduced)
    assert loss == pytest.approx(want_loss, rel=1e-10)
    # d loss / d eps(x +- h nu): each of the two rows carries half of d first / d eps, -+ the trace's
    g_first = c[:, None] * (eps if variance_reduced else proj[:, None] * n)
    g_trace = c[:, None] * (std / h)[:, None] * n
    want = np.concatenate([g_first - g_trace, g_first + g_trace]).reshape(net.dy.shape)
    np.testing.assert_allclose(net.dy, want, rtol=1e-10, atol=1e-14)


def test_fd_step_default_is_one_hundredth_of_the_noise_scale():
    sde, x0 = VP(), np.random.default_rng(2).uniform(-1, 1, (2, 4))
    net = Linear(4)
    losses.ssm_fd(net, sde, x0, np.random.default_rng(3))
    xt, t, std, w, nu = losses._ssm_batch(sde, x0, np.random.default_rng(3), "rademacher", 1, 1e-5, "noise")
    half = (net.x[:2] - net.x[2:]) / 2
    np.testing.assert_allclose(half, (1e-2 * std / 2)[:, None] * nu, rtol=1e-12)


@pytest.mark.parametrize("vr, plain", [(losses.ssm_vr, losses.ssm), (losses.ssm_vr_fd, losses.ssm_fd)])
def test_vr_variants_are_the_variance_reduced_losses(vr, plain):
    sde, x0 = VP(), np.random.default_rng(4).uniform(-1, 1, (3, 2))
    kw = dict(n_projections=2, projection="gaussian", t_min=1e-2)
    model = ScoreMLP(dim=2, widths=(8,), dtype=np.float64, seed=1)
    got = vr(model, sde, x0, np.random.default_rng(5), **kw)
    model2 = ScoreMLP(dim=2, widths=(8,), dtype=np.float64, seed=1)
    assert got == plain(model2, sde, x0, np.random.default_rng(5), variance_reduced=True, **kw)
    model3 = ScoreMLP(dim=2, widths=(8,), dtype=np.float64, seed=1)
    assert got != plain(model3, sde, x0, np.random.default_rng(5), variance_reduced=True)   # options matter
    model4 = ScoreMLP(dim=2, widths=(8,), dtype=np.float64, seed=1)
    assert got != plain(model4, sde, x0, np.random.default_rng(5), **kw)                    # VR matters


class LinearJVP(Linear):
    """Linear with forward mode: J_eps nu = A nu; records the cotangents it is given."""

    def forward_jvp(self, x, t, v):
        flat, vf = x.reshape(x.shape[0], -1), v.reshape(v.shape[0], -1)
        return (flat @ self.A.T + t[:, None] * self.b).reshape(x.shape), (vf @ self.A.T).reshape(x.shape)

    def backward_jvp(self, de, dedot):
        self.de, self.dedot = de.copy(), dedot.copy()


@pytest.mark.parametrize("variance_reduced, weighting", [(False, "likelihood"), (True, "none")])
def test_ssm_against_the_hand_computation(variance_reduced, weighting):
    sde, P = VP(0.1, 20.0, T=2.0), 2
    x0 = np.random.default_rng(1).uniform(-1, 1, (3, 4))
    net = LinearJVP(4)
    kw = dict(projection="gaussian", n_projections=P, t_min=1e-3, weighting=weighting)
    loss = losses.ssm(net, sde, x0, np.random.default_rng(7), variance_reduced=variance_reduced, **kw)
    xt, t, std, w, nu = losses._ssm_batch(sde, x0, np.random.default_rng(7), "gaussian", P, 1e-3, weighting)
    eps, nu, proj, c, want_loss = _by_hand(net, sde, xt, t, std, w, nu, variance_reduced)
    assert loss == pytest.approx(want_loss, rel=1e-10)
    np.testing.assert_allclose(net.de, 2 * c[:, None] * (eps if variance_reduced else proj[:, None] * nu), rtol=1e-10)
    np.testing.assert_allclose(net.dedot, -2 * (c * std)[:, None] * nu, rtol=1e-10)


@pytest.mark.parametrize("projection", ["rademacher", "gaussian"])
def test_ssm_batch_replays_its_draws(projection):
    """x_t = mean + std z from the draws t, z, then the probes, each sample repeated per probe."""
    sde, x0 = VP(), np.random.default_rng(2).uniform(-1, 1, (3, 2))
    xt, t, std, w, nu = losses._ssm_batch(sde, x0, np.random.default_rng(4), projection, 2, 1e-3, "noise")
    rng = np.random.default_rng(4)
    t0 = losses.sample_time(sde, 3, rng, 1e-3)
    z = rng.standard_normal(x0.shape)
    mean, s = sde.marginal(x0, t0)
    np.testing.assert_array_equal(xt, np.concatenate([mean + s * z] * 2))
    np.testing.assert_array_equal(t, np.tile(t0, 2))
    np.testing.assert_array_equal(nu, losses.sample_projections(xt.shape, rng, projection))


def test_exact_ssm_needs_both_forward_modes():
    sde, x0 = VP(), np.zeros((2, 4))
    for missing in ("forward_jvp", "backward_jvp"):
        net = LinearJVP(4)
        setattr(net, missing, None)
        with pytest.raises(ValueError, match="has no forward_jvp/backward_jvp"):
            losses.ssm(net, sde, x0, np.random.default_rng(0))


def test_weights_per_weighting_in_closed_form():
    """lambda / std^2: 1 for "noise" (lambda = std^2), g^2 / std^2 for "likelihood", 1 / std^2 for "none"."""
    sde, t = VP(0.1, 20.0, T=2.0), np.array([0.1, 0.7, 1.9])
    std = sde.marginal_coeffs(t)[1]
    np.testing.assert_array_equal(losses._eps_weights(sde, t, "noise"), np.ones(3))
    np.testing.assert_allclose(losses._eps_weights(sde, t, "likelihood"), sde.diffusion(t) ** 2 / std ** 2, rtol=1e-14)
    np.testing.assert_allclose(losses._eps_weights(sde, t, "none"), 1 / std ** 2, rtol=1e-14)


def test_batch_and_time_limits():
    sde = VP(T=2.0)
    for bad in (np.zeros((0, 3)), np.zeros(3)):
        with pytest.raises(ValueError, match=r"x0 must have shape \(B, \.\.\.\) with B >= 1"):
            losses.dsm(Linear(3), sde, bad, np.random.default_rng(0))
    assert np.isfinite(losses.dsm(Linear(1), sde, np.zeros((2, 1)), np.random.default_rng(0)))   # D = 1 is data
    with pytest.raises(ValueError, match="t_min"):
        losses.sample_time(sde, 2, np.random.default_rng(0), 2.0)             # t_min = T: no interval left
    assert np.all(losses.sample_time(sde, 5, np.random.default_rng(0), 1.9) >= 1.9)
