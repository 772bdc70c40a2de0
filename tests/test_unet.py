"""The UNet: the report's architecture (parameter count, shapes), finite-difference gradients
of a tiny UNet end to end (float64), spec round trip, bad inputs, backend routing."""
import json
import types

import numpy as np
import pytest

from refdiff.backend import REFERENCE
from refdiff.nn import make_model, model_from_spec
from refdiff.nn.unet import UNet, num_groups
from tests.helpers import TINY_UNETS, TOL, assert_close, assert_fd, fd_grad, inner

# the tiny networks of tests/helpers.py; t here is a DDPM step 1..1000, hence the smaller time_scale
TINY = {k: {**c, "time_scale": 0.01} for k, c in TINY_UNETS.items() if k != "flat"}


def _batch(model, B, rng, dtype=np.float64):
    c = model.config
    x = rng.standard_normal((B, c["in_channels"], c["image_size"], c["image_size"])).astype(dtype)
    return x, rng.integers(1, 1000, B).astype(np.float64)


# --- the report's network ----------------------------------------------------------------------
def test_seed_parameter_count():
    model = make_model("unet-seed")
    assert model.num_parameters() == 1_335_486
    # of which the GroupNorm of the very last block (10 channels) is built but bypassed
    assert model.params["dec.0.blocks.2.norm.weight"].shape == (10,)


def test_seed_architecture():
    model = make_model("unet-seed")
    assert model.sizes == [28, 14, 7, 3, 1]
    shapes = {k: v.shape for k, v in model.params.items()}
    # time MLP widths = stage input channels: 1, 10, 20, 40, 80, 160, 80, 40, 20
    widths = [shapes[f"{s}.time.0.weight"][0] for s in
              ["enc.0", "enc.1", "enc.2", "enc.3", "mid", "dec.3", "dec.2", "dec.1", "dec.0"]]
    assert widths == [1, 10, 20, 40, 80, 160, 80, 40, 20]
    assert all(shapes[f"{s}.time.0.weight"][1] == 100 for s in ["enc.0", "mid", "dec.0"])
    convs = lambda s: [shapes[f"{s}.blocks.{j}.conv{i}.weight"][:2] for j in range(3) for i in (1, 2)]
    assert convs("enc.0") == [(10, 1)] + [(10, 10)] * 5
    assert convs("mid") == [(40, 80), (40, 40), (40, 40), (40, 40), (80, 40), (80, 80)]
    assert convs("dec.3") == [(80, 160), (80, 80), (40, 80), (40, 40), (40, 40), (40, 40)]
    assert convs("dec.0") == [(10, 20), (10, 10), (10, 10), (10, 10), (10, 10), (10, 10)]
    assert shapes["down.0.0.weight"] == (10, 10, 4, 4) and shapes["down.1.0.weight"] == (20, 20, 4, 4)
    assert shapes["down.2.0.weight"] == (40, 40, 2, 2) and shapes["down.2.2.weight"] == (40, 40, 4, 4)
    assert shapes["up.3.0.weight"] == (80, 80, 4, 4) and shapes["up.3.2.weight"] == (80, 80, 2, 2)
    assert shapes["out.weight"] == (1, 10, 3, 3)
    assert [num_groups(c, 8) for c in (1, 10, 20, 40, 80, 160)] == [1, 5, 5, 8, 8, 8]


def test_seed_forward_backward_float32():
    rng = np.random.default_rng(0)
    model = make_model("unet-seed", dtype=np.float32)
    x, t = _batch(model, 2, rng, np.float32)
    y = model.forward(x, t)
    assert y.shape == (2, 1, 28, 28) and y.dtype == np.float32
    dx = model.backward(rng.standard_normal(y.shape).astype(np.float32))
    assert dx.shape == x.shape and dx.dtype == np.float32
    dead = {"dec.0.blocks.2.norm.weight", "dec.0.blocks.2.norm.bias"}
    for name, g in model.grads.items():
        assert g.dtype == np.float32
        assert (not g.any()) if name in dead else g.any(), f"{name}: unexpected gradient"


# --- finite differences, float64 ----------------------------------------------------------------
@pytest.mark.parametrize("case", sorted(TINY))
def test_unet_gradients(case):
    rng = np.random.default_rng(7)
    model = UNet(dtype=np.float64, seed=1, **TINY[case])
    for name in model.params:                      # move the GroupNorm affine off (1, 0)
        if ".norm." in name:
            model.params[name][...] += 0.3 * rng.standard_normal(model.params[name].shape)
    x, t = _batch(model, 2, rng)
    dy = rng.standard_normal(x.shape)
    loss = lambda: inner(model.forward(x, t), dy)
    model.zero_grad()
    model.forward(x, t)
    dx = model.backward(dy)
    assert_fd(dx, fd_grad(loss, x), name="dL/dx")
    for name, p in model.params.items():
        flat = p.reshape(-1)                             # a view: FD perturbs the parameter
        for i in rng.choice(flat.size, size=min(3, flat.size), replace=False):
            assert_fd(model.grads[name].reshape(-1)[i:i + 1], fd_grad(loss, flat[i:i + 1]), name=f"dL/d{name}[{i}]")


def test_gradients_accumulate():
    rng = np.random.default_rng(3)
    model = UNet(dtype=np.float64, **TINY["odd"])
    x, t = _batch(model, 2, rng)
    dy = rng.standard_normal(x.shape)
    model.zero_grad()
    model.forward(x, t)
    model.backward(dy)
    once = {k: g.copy() for k, g in model.grads.items()}
    model.forward(x, t)
    model.backward(dy)
    for k, g in model.grads.items():
        assert_close(g, 2 * once[k], name=k, **TOL[np.dtype(np.float64)])


# --- config, spec round trip, time scale ----------------------------------------------------------
@pytest.mark.parametrize("name, overrides", [("unet-seed", {}), ("unet-small", {}),
                                             ("unet-small", dict(blocks=1, channels=[4, 8])),
                                             ("unet", TINY["even"])])
def test_spec_round_trip(name, overrides):
    rng = np.random.default_rng(0)
    model = make_model(name, dtype=np.float64, seed=5, **overrides)
    spec = json.loads(json.dumps(model.spec()))          # checkpoints store the spec as JSON
    rebuilt = model_from_spec(spec)
    assert rebuilt.config == model.config and rebuilt.dtype == model.dtype
    assert {k: v.shape for k, v in rebuilt.params.items()} == {k: v.shape for k, v in model.params.items()}
    rebuilt.load_state(model.state())
    x, t = _batch(model, 1, rng)
    np.testing.assert_array_equal(rebuilt.forward(x, t), model.forward(x, t))


def test_same_seed_same_init():
    a, b, c = (UNet(dtype=np.float64, seed=s, **TINY["odd"]) for s in (4, 4, 5))
    assert all(np.array_equal(a.params[k], b.params[k]) for k in a.params)
    assert not all(np.array_equal(a.params[k], c.params[k]) for k in a.params if "norm" not in k)


def test_time_scale_multiplies_t():
    rng = np.random.default_rng(2)
    a = UNet(dtype=np.float64, seed=0, **{**TINY["odd"], "time_scale": 0.02})
    b = UNet(dtype=np.float64, seed=0, **{**TINY["odd"], "time_scale": 0.01})
    x, t = _batch(a, 2, rng)
    assert_close(a.forward(x, t), b.forward(x, 2 * t), name="time_scale", **TOL[np.dtype(np.float64)])
    assert not np.allclose(a.forward(x, t), a.forward(x, t + 50))   # t does reach the output


def test_float64_input_to_float32_model():
    model = UNet(dtype=np.float32, **TINY["even"])
    x, t = _batch(model, 2, np.random.default_rng(0), np.float64)
    assert model.forward(x, t).dtype == np.float32


# --- bad inputs -----------------------------------------------------------------------------------
def _bad(model, kind):
    x, t = _batch(model, 2, np.random.default_rng(0))
    if kind == "spatial":
        return x[:, :, :-1], t
    if kind == "channels":
        return np.concatenate([x, x], axis=1), t
    if kind == "rank":
        return x[0], t
    if kind == "nan_x":
        x[1, 0, 2, 3] = np.nan
    if kind == "inf_x":
        x[0, 0, 0, 0] = -np.inf
    if kind == "nan_t":
        t[1] = np.nan
    if kind == "t_shape":
        t = t[:1]
    return x, t


@pytest.mark.parametrize("kind, match", [("spatial", "expects x of shape"), ("channels", "expects x of shape"),
                                         ("rank", "expects x of shape"), ("nan_x", "NaN or Inf"),
                                         ("inf_x", "NaN or Inf"), ("nan_t", "t contains NaN"),
                                         ("t_shape", "expects t of shape")])
def test_bad_input(kind, match):
    model = UNet(dtype=np.float64, **TINY["odd"])
    with pytest.raises(ValueError, match=match):
        model.forward(*_bad(model, kind))


def test_bad_backward():
    model = UNet(dtype=np.float64, **TINY["odd"])
    with pytest.raises(RuntimeError, match="before forward"):
        model.backward(np.zeros((2, 2, 7, 7)))
    x, t = _batch(model, 2, np.random.default_rng(0))
    model.forward(x, t)
    with pytest.raises(ValueError, match="output's shape"):
        model.backward(np.zeros((2, 2, 7, 6)))


@pytest.mark.parametrize("overrides, match", [
    (dict(channels=[]), "channels"), (dict(image_size=3), "cannot be halved"), (dict(blocks=0), "blocks"),
    (dict(time_scale=float("nan")), "time_scale"), (dict(emb_dim=1), "emb_dim"), (dict(nonsense=1), "bad options"),
])
def test_bad_config(overrides, match):
    with pytest.raises(ValueError, match=match):
        make_model("unet", **{**TINY["odd"], **overrides})


# --- every op goes through the backend object ------------------------------------------------------
def test_ops_go_through_backend():
    calls = []

    def record(name, f):
        def g(*args, **kwargs):
            calls.append(name)
            return f(*args, **kwargs)
        return g

    ops = types.SimpleNamespace(**{k: record(k, v) if k.endswith(("_forward", "_backward")) else v
                                   for k, v in vars(REFERENCE).items()})
    rng = np.random.default_rng(0)
    plain = UNet(dtype=np.float64, seed=2, **TINY["odd"])
    routed = UNet(dtype=np.float64, seed=2, backend=ops, **TINY["odd"])
    x, t = _batch(plain, 2, rng)
    dy = rng.standard_normal(x.shape)
    y = routed.forward(x, t)
    np.testing.assert_array_equal(y, plain.forward(x, t))
    np.testing.assert_array_equal(routed.backward(dy), plain.backward(dy))
    n_conv = sum(1 for k, v in plain.params.items() if k.endswith(".weight") and v.ndim == 4)
    assert calls.count("conv2d_forward") + calls.count("conv_transpose2d_forward") == n_conv
    assert calls.count("conv2d_backward") + calls.count("conv_transpose2d_backward") == n_conv
    assert calls.count("group_norm_forward") == calls.count("group_norm_backward") > 0


# --- the input GroupNorm of the report's network ------------------------------------------------------
def test_seed_unet_cannot_see_input_brightness_and_the_fixed_one_can():
    """unet-seed normalises its raw 1-channel input per image, so eps_theta(a x + b) =
    eps_theta(x) for a > 0 (the flaw that saturates its samples); unet-seed-fixed skips
    that one norm, has the same parameters, and sees brightness. The input norm's own
    parameters get no gradient there, nor enc.0's time MLP in unet-seed."""
    rng = np.random.default_rng(0)
    seed, fixed = make_model("unet-seed", dtype=np.float64, seed=1), make_model("unet-seed-fixed", dtype=np.float64, seed=1)
    assert seed.num_parameters() == fixed.num_parameters() == 1_335_486
    assert all(np.array_equal(seed.params[k], fixed.params[k]) for k in seed.params)
    x, t = rng.standard_normal((2, 1, 28, 28)), np.array([0.3, 0.9])
    np.testing.assert_allclose(seed.forward(3.0 * x + 0.7, t), seed.forward(x, t), rtol=0, atol=1e-6)
    y = fixed.forward(x, t)
    assert np.abs(fixed.forward(3.0 * x + 0.7, t) - y).max() > 0.05 * np.abs(y).max()   # measured 0.09
    for m, dead in ((seed, "enc.0.time.2.weight"), (fixed, "enc.0.blocks.0.norm.weight")):
        m.zero_grad()
        m.forward(x, t)
        m.backward(rng.standard_normal((2, 1, 28, 28)))
        assert np.abs(m.grads[dead]).max() < 1e-9, dead
    assert np.abs(fixed.grads["enc.0.time.2.weight"]).max() > 1e-6


def test_skip_variant_adds_the_vp_std_times_x():
    """unet-seed-skip = unet-seed-fixed + c(t) x with c(t) = std_t of VP(0.1, 20), same
    parameters; its input gradient carries the c(t) dy of the skip."""
    from refdiff.sde import VP
    rng = np.random.default_rng(2)
    fixed, skip = (make_model(n, dtype=np.float64, seed=4) for n in ("unet-seed-fixed", "unet-seed-skip"))
    assert skip.num_parameters() == 1_335_486
    x, t = rng.standard_normal((3, 1, 28, 28)), np.array([0.001, 0.3, 1.0])
    c = VP(0.1, 20.0).marginal_coeffs(t)[1].reshape(-1, 1, 1, 1)
    assert_close(skip.forward(x, t), fixed.forward(x, t) + c * x, **TOL[np.dtype(np.float64)])
    dy = rng.standard_normal(x.shape)
    fixed.forward(x, t)
    assert_close(skip.backward(dy), fixed.backward(dy) + c * dy, **TOL[np.dtype(np.float64)])
