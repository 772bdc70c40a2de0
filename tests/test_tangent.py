"""Tangent op pairs (refdiff.nn.tangent) and the models' forward_jvp/backward_jvp, float64.

For each op f(x; theta): the tangent ydot agrees with central differences of the forward
along xdot, the primal y is the primal op's output unchanged, and the adjoint agrees with
central differences of S = <y, dy> + <ydot, dydot> with respect to x, xdot and every
parameter (random dy, dydot: never ones). Then the same end to end for the MLP and a UNet.
"""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refdiff.nn import functional as F
from refdiff.nn import make_model
from refdiff.nn import tangent as T
from refdiff.nn.unet import UNet
from refdiff.nn.unet_jvp import UNetJVP
from tests.helpers import FD_STEP, TINY_UNETS, TOL, assert_close, assert_fd, assert_grads_close, assert_zero, examples, fd_direction, fd_grad, fd_tangent, inner

small = st.integers(1, 3)
seeds = st.integers(0, 2**31)


def check_jvp(fwd, bwd, primal, x, xdot, params, rng, h=FD_STEP, scale=None):
    """fwd(x, xdot, *params) -> (y, ydot, cache); bwd(dy, dydot, cache) -> (dx, dxdot, *dparams);
    primal(x, *params) -> y. Checks the tangent, the primal and all gradients against FD.
    scale: per output entry, the intermediates' magnitude where it exceeds |y| (FD rounding)."""
    y, ydot, cache = fwd(x, xdot, *params)
    assert_close(y, primal(x, *params), name="primal output", rtol=0, atol=0)
    assert_fd(ydot, fd_tangent(lambda x: primal(x, *params), x, xdot, h, scale), name="tangent vs FD")
    dy, dydot = rng.standard_normal(y.shape), rng.standard_normal(ydot.shape)
    grads = bwd(dy, dydot, cache)
    assert len(grads) == 2 + len(params)

    def S():
        y, ydot, _ = fwd(x, xdot, *params)
        return inner(y, dy, ydot, dydot)

    s_scale = None if scale is None else float(np.sum(scale * (np.abs(dy) + np.abs(dydot))))
    for name, a, g in zip(["x", "xdot"] + [f"param {k}" for k in range(len(params))], [x, xdot, *params], grads):
        if a is None:
            assert g is None, f"{name}: no parameter, so no gradient expected"
            continue
        assert_fd(g, fd_grad(S, a, h, s_scale), name=f"d S / d {name}")


# --- ops --------------------------------------------------------------------------------------------
@settings(max_examples=examples(25), deadline=None)
@given(b=small, d_in=small, d_out=small, bias=st.booleans(), seed=seeds)
def test_linear_jvp(b, d_in, d_out, bias, seed):
    rng = np.random.default_rng(seed)
    x, xdot, w = rng.standard_normal((b, d_in)), rng.standard_normal((b, d_in)), rng.standard_normal((d_out, d_in))
    bb = rng.standard_normal(d_out) if bias else None
    check_jvp(T.linear_jvp_forward, T.linear_jvp_backward, lambda x, w, b: F.linear_forward(x, w, b)[0],
              x, xdot, [w, bb], rng)


@settings(max_examples=examples(25), deadline=None)
@given(shape=st.lists(small, min_size=1, max_size=4), seed=seeds)
def test_silu_jvp(shape, seed):
    rng = np.random.default_rng(seed)
    x = 3 * rng.standard_normal(shape)     # spans both tails, where f'' changes sign
    # silu = x (1 + tanh(x/2)) / 2 rounds 1 + tanh(x/2) to u: its error is u |x|, not u |y|
    check_jvp(T.silu_jvp_forward, T.silu_jvp_backward, lambda x: F.silu_forward(x)[0],
              x, rng.standard_normal(shape), [], rng, scale=np.abs(x))


@settings(max_examples=examples(20), deadline=None)
@given(b=small, c=small, hw=st.lists(small, min_size=0, max_size=2), seed=seeds)
def test_add_channel_bias_jvp(b, c, hw, seed):
    rng = np.random.default_rng(seed)
    x, xdot = rng.standard_normal([b, c] + hw), rng.standard_normal([b, c] + hw)
    check_jvp(T.add_channel_bias_jvp_forward, T.add_channel_bias_jvp_backward,
              lambda x, v: F.add_channel_bias_forward(x, v)[0], x, xdot, [rng.standard_normal((b, c))], rng)


@settings(max_examples=examples(20), deadline=None)
@given(b=small, c1=small, c2=small, hw=st.lists(small, min_size=0, max_size=2), seed=seeds)
def test_concat_jvp(b, c1, c2, hw, seed):
    # concat takes a list: check it as a function of the first input, the second held fixed,
    # and of the second with the first fixed
    rng = np.random.default_rng(seed)
    a, ad = rng.standard_normal([b, c1] + hw), rng.standard_normal([b, c1] + hw)
    c, cd = rng.standard_normal([b, c2] + hw), rng.standard_normal([b, c2] + hw)
    y, ydot, cache = T.concat_jvp_forward([a, c], [ad, cd])
    assert_close(y, np.concatenate([a, c], axis=1), name="primal", rtol=0, atol=0)
    assert_close(ydot, np.concatenate([ad, cd], axis=1), name="tangent", rtol=0, atol=0)
    dy, dydot = rng.standard_normal(y.shape), rng.standard_normal(y.shape)
    (da, dc), (dad, dcd) = T.concat_jvp_backward(dy, dydot, cache)
    S = lambda: inner(T.concat_jvp_forward([a, c], [ad, cd])[0], dy, T.concat_jvp_forward([a, c], [ad, cd])[1], dydot)
    for name, arr, g in (("a", a, da), ("c", c, dc), ("adot", ad, dad), ("cdot", cd, dcd)):
        assert_fd(g, fd_grad(S, arr), name=name)


@st.composite
def conv_case(draw, transpose):
    B, Cin, Cout, k = draw(small), draw(small), draw(small), draw(st.integers(1, 4))
    stride, padding = draw(st.integers(1, 2)), draw(st.integers(0, 1))
    if transpose:
        H = draw(st.integers(1 + max(0, -((k - 1 - 2 * padding) // stride)), 4))
    else:
        H = draw(st.integers(max(1, k - 2 * padding), 5))
    return dict(B=B, Cin=Cin, Cout=Cout, H=H, k=k, stride=stride, padding=padding,
                bias=draw(st.booleans()), seed=draw(seeds))


@pytest.mark.parametrize("transpose", [False, True], ids=["conv2d", "conv_transpose2d"])
@settings(max_examples=examples(20), deadline=None)
@given(data=st.data())
def test_conv_jvp(transpose, data):
    c = data.draw(conv_case(transpose))
    rng = np.random.default_rng(c["seed"])
    x = rng.standard_normal((c["B"], c["Cin"], c["H"], c["H"] + 1))
    wshape = (c["Cin"], c["Cout"]) if transpose else (c["Cout"], c["Cin"])
    w = rng.standard_normal(wshape + (c["k"], c["k"]))
    b = rng.standard_normal(c["Cout"]) if c["bias"] else None
    name = "conv_transpose2d" if transpose else "conv2d"
    s, p = c["stride"], c["padding"]
    fwd = lambda x, xd, w, b: getattr(T, name + "_jvp_forward")(x, xd, w, b, s, p)
    primal = lambda x, w, b: getattr(F, name + "_forward")(x, w, b, s, p)[0]
    check_jvp(fwd, getattr(T, name + "_jvp_backward"), primal, x, rng.standard_normal(x.shape), [w, b], rng)


@pytest.mark.parametrize("fused", [False, True], ids=["group_norm", "group_norm_silu"])
@settings(max_examples=examples(25), deadline=None)
@given(G=st.integers(1, 3), per=small, B=small, spatial=st.lists(st.integers(1, 3), max_size=2), seed=seeds)
def test_group_norm_jvp(fused, G, per, B, spatial, seed):
    if per * int(np.prod(spatial)) < 3:
        # a group of n <= 2 values normalises to +-1 whatever x is: the derivatives are O(eps)
        # (~2e-4 here) and the finite differences' own error (~1e-8) is then past atol. Found by
        # hypothesis (G=3, per=2, no spatial axes). As in refdiff_cuda.testing: keep n >= 3.
        spatial = list(spatial) + [3]
    rng = np.random.default_rng(seed)
    shape = (B, G * per, *spatial)
    x = 2 * rng.standard_normal(shape) + 1
    gamma, beta = rng.standard_normal(G * per), rng.standard_normal(G * per)
    name = "group_norm_silu" if fused else "group_norm"
    fwd = lambda x, xd, g, b: getattr(T, name + "_jvp_forward")(x, xd, G, g, b)
    primal = lambda x, g, b: getattr(F, name + "_forward")(x, G, g, b)[0]
    check_jvp(fwd, getattr(T, name + "_jvp_backward"), primal, x, rng.standard_normal(shape), [gamma, beta], rng)


def test_group_norm_tangent_known_values():
    # xdot = a x + b (per group) moves along the directions GroupNorm removes or keeps:
    # a shift has no effect (ydot = 0); a scale of the centred input changes xhat by
    # a eps/(var+eps) xhat (it would be 0 with eps = 0)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, 3))
    gamma, beta = np.ones(4), np.zeros(4)
    _, ydot, _ = T.group_norm_jvp_forward(x, np.full_like(x, 0.7), 2, gamma, beta)
    assert_zero(ydot, np.abs(x).max(), name="shift")
    xg = x.reshape(2, 2, -1)
    xc = (xg - xg.mean(axis=2, keepdims=True)).reshape(x.shape)
    var = xg.var(axis=2)[:, :, None]
    _, ydot, _ = T.group_norm_jvp_forward(x, xc, 2, gamma, beta, eps=1e-2)
    expect = (xc.reshape(xg.shape) / np.sqrt(var + 1e-2) * 1e-2 / (var + 1e-2)).reshape(x.shape)
    assert_close(ydot, expect, name="scale", **TOL[np.dtype(np.float64)])


@pytest.mark.parametrize("op, args", [
    ("linear", lambda x: (np.zeros((2, 3)), np.zeros(2))),
    ("silu", lambda x: ()),
    ("conv2d", lambda x: (np.zeros((2, 3, 1, 1)), None)),
    ("group_norm", lambda x: (1, np.ones(3), np.zeros(3))),
])
def test_tangent_shape_must_match(op, args):
    x = np.zeros((4, 3, 2, 2)) if op in ("conv2d", "group_norm") else np.zeros((4, 3))
    with pytest.raises(ValueError, match="tangent xdot must have the shape"):
        getattr(T, op + "_jvp_forward")(x, np.zeros((4, 2) + x.shape[2:]), *args(x))


def test_tangent_ops_binds_the_backends_pairs():
    sentinel = object()
    backend = type("B", (), {"silu_jvp_forward": sentinel})()
    ops = T.tangent_ops(backend)
    assert ops.silu_jvp_forward is sentinel                           # a backend's own fused pair wins
    assert ops.linear_jvp_forward.func is T.linear_jvp_forward        # else ours, on its primal pairs
    assert ops.linear_jvp_forward.keywords["ops"] is backend


# --- models end to end -------------------------------------------------------------------------------
JVPUNet = UNet   # UNet carries forward_jvp/backward_jvp (mixin UNetJVP)
assert issubclass(UNet, UNetJVP)


def _model(kind, dtype=np.float64, seed=3):
    if kind == "mlp":
        return make_model("mlp", dim=3, widths=[5, 4], emb_dim=4, temb_dim=3, dtype=dtype, seed=seed)
    m = JVPUNet(dtype=dtype, seed=seed, **TINY_UNETS[kind])
    rng = np.random.default_rng(seed)
    for k in m.params:          # away from PyTorch's init (gamma = 1, beta = 0), so every term counts
        if ".norm." in k:
            m.params[k][...] = 1 + 0.5 * rng.standard_normal(m.params[k].shape)
    return m


def _inputs(model, B, rng):
    c = model.config
    shape = (B, c["dim"]) if "dim" in c else (B, c["in_channels"], c["image_size"], c["image_size"])
    return rng.standard_normal(shape), rng.uniform(0.05, 1.0, B), rng.standard_normal(shape)


def check_directional(S, params, grads, rng, h=FD_STEP):
    """For each parameter array p: <grad, delta> vs (S(p + h delta) - S(p - h delta)) / 2h along
    a random delta. Two evaluations per array instead of two per entry (the UNets have
    thousands of entries); a wrong entry would have to be orthogonal to a random delta to hide."""
    for k, p in params.items():
        delta = rng.standard_normal(p.shape)
        assert_fd(np.sum(grads[k] * delta), fd_direction(S, p, delta, h), name=f"{k} along a random direction")


@pytest.mark.parametrize("kind", ["mlp", "odd", "even", "skip"])      # skip: the input_skip path
def test_model_jvp_matches_finite_differences(kind):
    model, rng = _model(kind), np.random.default_rng(0)
    x, t, v = _inputs(model, 2, rng)
    eps, eps_dot = model.forward_jvp(x, t, v)
    assert_close(eps, model.forward(x, t), name="primal", rtol=0, atol=0)
    assert_fd(eps_dot, fd_tangent(lambda x: model.forward(x, t), x, v), name="tangent vs FD")
    dy, dydot = rng.standard_normal(eps.shape), rng.standard_normal(eps.shape)
    model.zero_grad()
    model.forward_jvp(x, t, v)
    dx = model.backward_jvp(dy, dydot)

    def S():
        e, ed = model.forward_jvp(x, t, v)
        return inner(e, dy, ed, dydot)

    assert_fd(dx, fd_grad(S, x), name="dx")
    if kind == "mlp":             # every entry of every parameter
        for k, p in model.params.items():
            assert_fd(model.grads[k], fd_grad(S, p), name=k)
    else:                         # every entry of the first norm, every array along a random direction
        for k in ["enc.0.blocks.0.norm.weight", "enc.0.blocks.0.norm.bias"]:
            assert_fd(model.grads[k], fd_grad(S, model.params[k]), name=k)
        check_directional(S, model.params, model.grads, rng)


@pytest.mark.parametrize("kind", ["mlp", "odd"])
def test_model_jvp_float32(kind):
    """float32 forward_jvp/backward_jvp agree with float64 (same weights) to float32 accuracy."""
    m64, m32 = _model(kind), _model(kind, np.float32)
    m32.load_state(m64.state())
    rng = np.random.default_rng(1)
    x, t, v = _inputs(m64, 3, rng)
    dy, dydot = rng.standard_normal((2,) + x.shape)
    out = {}
    for m in (m64, m32):
        m.zero_grad()
        e, ed = m.forward_jvp(x.astype(m.dtype), t, v.astype(m.dtype))
        out[m.dtype] = (e, ed, m.backward_jvp(dy.astype(m.dtype), dydot.astype(m.dtype)))
    assert all(a.dtype == np.float32 for a in out[np.dtype(np.float32)])
    for a, b in zip(out[np.dtype(np.float32)], out[np.dtype(np.float64)]):
        assert_close(a, b, name="float32 vs float64", **TOL[np.dtype(np.float32)])
    assert_grads_close(m32.grads, m64.grads, TOL[np.dtype(np.float32)], "float32 vs float64")


@pytest.mark.parametrize("kind", ["mlp", "odd"])
def test_model_jvp_bad_input(kind):
    model, rng = _model(kind), np.random.default_rng(0)
    x, t, v = _inputs(model, 2, rng)
    with pytest.raises(ValueError, match="direction v must have the shape"):
        model.forward_jvp(x, t, v[:1])
    with pytest.raises(RuntimeError, match="before forward_jvp"):
        _model(kind).backward_jvp(x, v)


@pytest.mark.parametrize("kind", ["mlp", "odd"])
def test_model_jvp_on_another_backend_agrees(kind):
    """The tangent pairs run on a model's backend (its primal kernels): numba vs the reference."""
    pytest.importorskip("numba")
    ref, fast = _model(kind, np.float32), _model(kind, np.float32)
    fast = type(fast)(dtype=np.float32, seed=3, backend="numba", **fast.config) if kind != "mlp" else \
        make_model("mlp", dim=3, widths=[5, 4], emb_dim=4, temb_dim=3, dtype=np.float32, seed=3, backend="numba")
    fast.load_state(ref.state())
    rng = np.random.default_rng(2)
    x, t, v = (a.astype(np.float32) for a in _inputs(ref, 3, rng))
    dy, dydot = rng.standard_normal((2,) + x.shape).astype(np.float32)
    got = {}
    for m in (ref, fast):
        m.zero_grad()
        e, ed = m.forward_jvp(m.ops.asarray(x), t, m.ops.asarray(v))
        dx = m.backward_jvp(m.ops.asarray(dy), m.ops.asarray(dydot))
        got[m.ops.name] = ([m.ops.to_numpy(a) for a in (e, ed, dx)], {k: m.ops.to_numpy(g) for k, g in m.grads.items()})
    assert ref.ops.name != fast.ops.name
    (out_fast, g_fast), (out_ref, g_ref) = got[fast.ops.name], got[ref.ops.name]
    for a, b in zip(out_fast, out_ref):
        assert_close(a, b, name="numba vs reference", **TOL[np.dtype(np.float32)])
    assert_grads_close(g_fast, g_ref, TOL[np.dtype(np.float32)], "numba vs reference")


def test_fused_group_norm_silu_passes_eps_on():
    """group_norm_silu (primal and tangent) = silu(group_norm(.)) for a non-default eps too
    (eps = 0.5 changes the result by O(1), so a dropped eps cannot hide)."""
    rng = np.random.default_rng(0)
    x, xdot = rng.standard_normal((2, 4, 3)), rng.standard_normal((2, 4, 3))
    g, b = 1 + 0.5 * rng.standard_normal(4), rng.standard_normal(4)
    z, _ = F.group_norm_forward(x, 2, g, b, eps=0.5)
    assert_close(F.group_norm_silu_forward(x, 2, g, b, eps=0.5)[0], F.silu_forward(z)[0], name="primal", **TOL[np.dtype(np.float64)])
    z, zdot, _ = T.group_norm_jvp_forward(x, xdot, 2, g, b, eps=0.5)
    y, ydot, _ = T.silu_jvp_forward(z, zdot)
    y2, ydot2, _ = T.group_norm_silu_jvp_forward(x, xdot, 2, g, b, eps=0.5)
    assert_close(y2, y, name="tangent primal", **TOL[np.dtype(np.float64)])
    assert_close(ydot2, ydot, name="tangent", **TOL[np.dtype(np.float64)])
