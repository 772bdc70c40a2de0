"""unet-ddpm (refdiff.nn.unet_ddpm), a tiny configuration in float64, end to end: the input
gradient and the parameter gradients against central differences (dropout on and off for a
fixed generator, with and without labels), forward_jvp / backward_jvp likewise and on the
numba backend against the reference, the deterministic network without an rng, what labels
change, bad input.

The tiny network: channels (4, 8) (8 x 8 -> 4 x 4), one block per level, attention at the
last level (and the middle) with two heads, three classes, dropout 0.1, groups of two
channels. zero_init=False and norms away from (1, 0): with the zero-initialised last convs
most gradients would be zero and most terms could not be seen.
"""
import numpy as np
import pytest

from refdiff.nn import make_model
from refdiff.nn.unet_ddpm import UNetDDPM
from tests.helpers import TOL, assert_close, assert_grads_close, assert_fd, fd_direction, fd_grad, fd_tangent, fd_vjp, inner

TINY = dict(in_channels=1, image_size=8, channels=(4, 8), blocks=1, attention=(1,), heads=2, num_classes=3,
            dropout=0.1, max_groups=2, time_scale=10.0, zero_init=False)
FULL = ["in.weight", "down.1.attn.0.qkv.bias", "mid.attn.norm.weight", "label.weight", "temb.0.bias",
        "up.0.res.0.norm2.bias"]       # small tensors checked entry by entry; every tensor along a random direction


def _model(seed=3, dtype=np.float64, backend=None, **overrides):
    m = UNetDDPM(dtype=dtype, seed=seed, backend=backend, **dict(TINY, **overrides))
    rng = np.random.default_rng(seed)
    for k in m.params:
        if ".norm" in k:
            m.params[k][...] = (k.endswith(".weight")) + 0.5 * rng.standard_normal(m.params[k].shape)
    return m


def _inputs(B=2, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((B, 1, 8, 8)), rng.uniform(0.05, 1.0, B), rng


def _check_directional(S, model, rng, names=None):
    """<grad, delta> vs central differences of S along a random delta, per parameter array
    (two evaluations per array; a wrong entry would have to be orthogonal to delta to hide)."""
    for k in names or model.params:
        p = model.params[k]
        delta = rng.standard_normal(p.shape)
        assert_fd(np.sum(model.grads[k] * delta), fd_direction(S, p, delta), name=f"{k} along a random direction")


# unconditional without dropout, and labels with dropout: each path on and off, in two cases
# (the suite's time budget; each case checks every parameter tensor)
CASES = [(False, False), (True, True)]
IDS = ["plain", "labels+dropout"]


@pytest.mark.parametrize("labels, dropout", CASES, ids=IDS)
def test_gradients_match_finite_differences(labels, dropout):
    model = _model()
    x, t, rng = _inputs()
    y = np.array([0, 2]) if labels else None
    # a fresh generator of one seed per evaluation: the same dropout masks every time
    draw = (lambda: np.random.default_rng(11)) if dropout else (lambda: None)
    f = lambda: model.forward(x, t, y, draw())
    out = f()
    dy = rng.standard_normal(out.shape)
    model.zero_grad()
    model.forward(x, t, y, draw())
    dx = model.backward(dy)
    assert_fd(dx, fd_vjp(f, dy, x), name="dx")
    S = lambda: inner(f(), dy)
    for k in FULL:
        assert_fd(model.grads[k], fd_grad(S, model.params[k]), name=k)
    _check_directional(S, model, rng)
    if labels:        # the label embedding's columns of labels not in the batch get nothing
        unused = sorted(set(range(4)) - set(y.tolist()))
        np.testing.assert_array_equal(model.grads["label.weight"][:, unused], 0)


@pytest.mark.parametrize("labels, dropout", CASES, ids=IDS)
def test_jvp_matches_finite_differences(labels, dropout):
    model = _model()
    x, t, rng = _inputs(seed=1)
    v = rng.standard_normal(x.shape)
    y = np.array([1, 3]) if labels else None
    draw = (lambda: np.random.default_rng(12)) if dropout else (lambda: None)
    e, e_dot = model.forward_jvp(x, t, v, y, draw())
    assert_close(e, model.forward(x, t, y, draw()), name="primal", rtol=0, atol=0)
    assert_fd(e_dot, fd_tangent(lambda x: model.forward(x, t, y, draw()), x, v), name="tangent vs FD")
    dy, dydot = rng.standard_normal((2,) + e.shape)
    model.zero_grad()
    model.forward_jvp(x, t, v, y, draw())
    dx = model.backward_jvp(dy, dydot)

    def S():
        a, b = model.forward_jvp(x, t, v, y, draw())
        return inner(a, dy, b, dydot)

    assert_fd(dx, fd_grad(S, x), name="dx")
    for k in ["down.1.attn.0.qkv.bias", "mid.attn.norm.weight"]:
        assert_fd(model.grads[k], fd_grad(S, model.params[k]), name=k)
    _check_directional(S, model, rng)


def test_jvp_leaves_a_pending_primal_pass_alone():
    """forward, then forward_jvp / backward_jvp, then the primal backward: the primal
    gradients are those of a forward/backward with no JVP pass in between."""
    x, t, rng = _inputs()
    v, dy = rng.standard_normal((2,) + x.shape)
    ref = _model()
    ref.zero_grad()
    ref.forward(x, t, np.array([0, 1]))
    dx_ref = ref.backward(dy)
    m = _model()
    m.forward(x, t, np.array([0, 1]))
    m.forward_jvp(x, t, v)
    m.backward_jvp(dy, dy)
    m.zero_grad()
    dx = m.backward(dy)
    assert_close(dx, dx_ref, name="dx", rtol=0, atol=0)
    for k in ref.grads:
        assert_close(m.grads[k], ref.grads[k], name=k, rtol=0, atol=0)


def test_without_rng_the_network_is_deterministic_and_dropout_free():
    x, t, _ = _inputs()
    m, m0 = _model(), _model(dropout=0.0)
    m0.load_state(m.state())
    y = np.array([2, 0])
    a = m.forward(x, t, y)
    np.testing.assert_array_equal(m.forward(x, t, y), a)
    np.testing.assert_array_equal(m0.forward(x, t, y), a)                  # rng=None: dropout off
    np.testing.assert_array_equal(m0.forward(x, t, y, np.random.default_rng(0)), a)   # p = 0: off
    b = m.forward(x, t, y, np.random.default_rng(0))
    assert np.abs(b - a).max() > 1e-3 * np.abs(a).max(), "dropout 0.1 with an rng must change the output"
    np.testing.assert_array_equal(m.forward(x, t, y, np.random.default_rng(0)), b)    # same seed, same masks


def test_labels_change_the_output_of_a_conditional_model_only():
    x, t, _ = _inputs()
    m = _model()
    base = m.forward(x, t, np.array([0, 0]))
    for y in ([1, 0], [0, 2]):
        diff = np.abs(m.forward(x, t, np.array(y)) - base).max(axis=(1, 2, 3))
        changed = np.array(y) != 0
        assert (diff[changed] > 1e-6).all() and (diff[~changed] == 0).all(), (y, diff)
    np.testing.assert_array_equal(m.forward(x, t), m.forward(x, t, np.array([3, 3])))   # None = the null label
    u = _model(num_classes=0)
    assert not any(k.startswith("label") for k in u.params)
    with pytest.raises(ValueError, match="unconditional .*labels y must be None"):
        u.forward(x, t, np.array([0, 0]))


@pytest.mark.parametrize("y, match", [
    ([0, 4], r"labels y must lie in \[0, 3\]"),
    ([-1, 0], r"labels y must lie in \[0, 3\]"),
    ([0.5, 1], "labels y must be integers"),
    ([0, 1, 2], r"labels y must be integers of shape \(2,\)"),
])
def test_bad_labels(y, match):
    x, t, _ = _inputs()
    with pytest.raises(ValueError, match=match):
        _model().forward(x, t, np.array(y))


@pytest.mark.parametrize("overrides, match", [
    (dict(attention=(2,)), r"attention at level\(s\) \[2\]: the network has levels 0..1"),
    (dict(attention=(-1,)), r"attention at level\(s\) \[-1\]"),
    (dict(heads=3), "heads=3 must divide the 8 channels of attention level 1"),
    (dict(image_size=7), "image_size 7 must be divisible by 2"),
    (dict(dropout=1.0), "dropout"),
])
def test_bad_config(overrides, match):
    with pytest.raises(ValueError, match=match):
        _model(**overrides)


def test_bad_rng():
    x, t, _ = _inputs()
    with pytest.raises(TypeError, match=r"rng \(dropout\) must be a numpy.random.Generator"):
        _model().forward(x, t, None, 42)


def test_registry_default_size():
    # the default network: about 1-2 M parameters, as the docstring says
    m = make_model("unet-ddpm", dtype=np.float32)
    n = sum(p.size for p in m.params.values())
    assert 1_000_000 <= n <= 2_000_000, n
    out = m.forward(np.random.default_rng(0).standard_normal((1, 1, 28, 28)).astype(np.float32), np.array([0.5]))
    np.testing.assert_array_equal(out, 0)       # zero-initialised output conv: the network starts at 0


def test_jvp_on_the_numba_backend_agrees():
    """The tangent pairs run on the model's backend (its attention, upsampling and dropout
    kernels, the masks drawn on the host from the same generator): numba vs the reference in
    float32, labels and dropout on, within float32's tolerance (refdiff_cuda.testing.TOL)."""
    pytest.importorskip("numba")
    ref, fast = _model(dtype=np.float32), _model(dtype=np.float32, backend="numba")
    fast.load_state(ref.state())
    x, t, rng = _inputs(seed=2)
    v, dy, dydot = (a.astype(np.float32) for a in rng.standard_normal((3,) + x.shape))
    got = {}
    for m in (ref, fast):
        m.zero_grad()
        e, e_dot = m.forward_jvp(m.ops.asarray(x.astype(np.float32)), t, m.ops.asarray(v), np.array([0, 2]),
                                 np.random.default_rng(5))
        dx = m.backward_jvp(m.ops.asarray(dy), m.ops.asarray(dydot))
        got[m.ops.name] = ([m.ops.to_numpy(a) for a in (e, e_dot, dx)], {k: m.ops.to_numpy(g) for k, g in m.grads.items()})
    assert ref.ops.name != fast.ops.name
    (out_fast, g_fast), (out_ref, g_ref) = got[fast.ops.name], got[ref.ops.name]
    f32 = TOL[np.dtype(np.float32)]
    for name, a, b in zip(["eps", "eps_dot", "dx"], out_fast, out_ref):
        assert a.dtype == np.float32
        assert_close(a, b, name=f"{name}: numba vs reference", **f32)
    assert_grads_close(g_fast, g_ref, f32, "numba vs reference")
