"""conv2d, conv_transpose2d, group_norm(+SiLU), max_pool2d: finite-difference gradient checks
(float64), fast vs naive-loop agreement (float64 and float32), dtypes, bad arguments."""
import numpy as np
import pytest
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from refdiff.nn import functional as F
from tests.helpers import TOL, assert_close, assert_zero, check_grads, examples

small = st.integers(1, 3)


@st.composite
def conv_case(draw, transpose=False):
    """A valid (conv2d or conv_transpose2d) problem: shapes include 1s and odd sizes."""
    B, Cin, Cout = draw(small), draw(small), draw(small)
    kH = draw(st.integers(1, 4))
    kW = kH if draw(st.booleans()) else draw(st.integers(1, 4))   # square + stride 1: conv2d's other dx branch
    stride, padding = draw(st.integers(1, 3)), draw(st.integers(0, 2))
    if transpose:   # need (H-1) s - 2p + k >= 1
        lo = lambda k: 1 + max(0, -((k - 1 - 2 * padding) // stride))
        H, W = draw(st.integers(lo(kH), 6)), draw(st.integers(lo(kW), 6))
    else:           # need H + 2p >= k
        H, W = draw(st.integers(max(1, kH - 2 * padding), 7)), draw(st.integers(max(1, kW - 2 * padding), 7))
    return dict(B=B, Cin=Cin, Cout=Cout, H=H, W=W, kH=kH, kW=kW, stride=stride, padding=padding,
                bias=draw(st.booleans()), seed=draw(st.integers(0, 2**31)))


def _arrays(c, transpose, dtype=np.float64):
    rng = np.random.default_rng(c["seed"])
    x = rng.standard_normal((c["B"], c["Cin"], c["H"], c["W"]))
    wshape = (c["Cin"], c["Cout"]) if transpose else (c["Cout"], c["Cin"])
    w = rng.standard_normal(wshape + (c["kH"], c["kW"]))
    b = rng.standard_normal(c["Cout"]) if c["bias"] else None
    cast = lambda a: None if a is None else a.astype(dtype)
    return cast(x), cast(w), cast(b), rng


def _grad_check(fwd, bwd, x, w, b, stride, padding, rng):
    if b is None:
        check_grads(lambda x, w: fwd(x, w, None, stride, padding), lambda dy, c: bwd(dy, c)[:2], [x, w], rng)
    else:
        check_grads(lambda x, w, b: fwd(x, w, b, stride, padding), bwd, [x, w, b], rng)


# --- conv2d -------------------------------------------------------------------------------------
@settings(max_examples=examples(60), deadline=None)
@given(c=conv_case())
def test_conv2d_matches_naive(c):
    x, w, b, _ = _arrays(c, False)
    ref, _ = F.conv2d_naive_forward(x, w, b, c["stride"], c["padding"])
    y, _ = F.conv2d_forward(x, w, b, c["stride"], c["padding"])
    assert_close(y, ref, name="conv2d float64", **TOL[np.dtype(np.float64)])
    x32, w32, b32, _ = _arrays(c, False, np.float32)
    y32, _ = F.conv2d_forward(x32, w32, b32, c["stride"], c["padding"])
    assert y32.dtype == np.float32
    assert_close(y32, ref, name="conv2d float32 vs float64 naive", **TOL[np.dtype(np.float32)])


@settings(max_examples=examples(40), deadline=None)
@given(c=conv_case())
def test_conv2d_grad(c):
    x, w, b, rng = _arrays(c, False)
    _grad_check(F.conv2d_forward, F.conv2d_backward, x, w, b, c["stride"], c["padding"], rng)


def test_conv2d_known_values():
    # 1 channel, 3x3 input, 2x2 all-ones kernel, padding 1: each output sums a window.
    x = np.arange(9.0).reshape(1, 1, 3, 3)
    y, _ = F.conv2d_forward(x, np.ones((1, 1, 2, 2)), np.array([0.5]), stride=2, padding=1)
    np.testing.assert_array_equal(y[0, 0], [[0.5, 1 + 2 + 0.5], [3 + 6 + 0.5, 4 + 5 + 7 + 8 + 0.5]])


# --- conv_transpose2d -----------------------------------------------------------------------------
@settings(max_examples=examples(60), deadline=None)
@given(c=conv_case(transpose=True))
def test_conv_transpose2d_matches_naive(c):
    x, w, b, _ = _arrays(c, True)
    ref, _ = F.conv_transpose2d_naive_forward(x, w, b, c["stride"], c["padding"])
    y, _ = F.conv_transpose2d_forward(x, w, b, c["stride"], c["padding"])
    assert y.shape == (c["B"], c["Cout"], (c["H"] - 1) * c["stride"] - 2 * c["padding"] + c["kH"],
                       (c["W"] - 1) * c["stride"] - 2 * c["padding"] + c["kW"])
    assert_close(y, ref, name="conv_transpose2d float64", **TOL[np.dtype(np.float64)])
    x32, w32, b32, _ = _arrays(c, True, np.float32)
    y32, _ = F.conv_transpose2d_forward(x32, w32, b32, c["stride"], c["padding"])
    assert y32.dtype == np.float32
    assert_close(y32, ref, name="conv_transpose2d float32 vs float64 naive", **TOL[np.dtype(np.float32)])


@settings(max_examples=examples(40), deadline=None)
@given(c=conv_case(transpose=True))
def test_conv_transpose2d_grad(c):
    x, w, b, rng = _arrays(c, True)
    _grad_check(F.conv_transpose2d_forward, F.conv_transpose2d_backward, x, w, b, c["stride"], c["padding"], rng)


@settings(max_examples=examples(30), deadline=None)
@given(c=conv_case())
def test_conv_transpose_is_adjoint_of_conv(c):
    # <conv2d(x; w), y> = <x, conv_transpose2d(y; w)> whenever the transposed conv maps
    # back onto x's size (true when (H + 2p - k) is a multiple of the stride).
    x, w, _, rng = _arrays(c, False)
    s, p = c["stride"], c["padding"]
    H, W = c["H"] - (c["H"] + 2 * p - c["kH"]) % s, c["W"] - (c["W"] + 2 * p - c["kW"]) % s
    assume(min(H, W) >= 1 and H + 2 * p >= c["kH"] and W + 2 * p >= c["kW"])
    x = x[:, :, :H, :W]
    cx, _ = F.conv2d_forward(x, w, None, s, p)
    y = rng.standard_normal(cx.shape)
    ty, _ = F.conv_transpose2d_forward(y, w, None, s, p)
    assert ty.shape == x.shape
    assert_close(np.sum(ty * x), np.sum(cx * y), name="adjoint identity", **TOL[np.dtype(np.float64)])


# --- float32 stays float32 through every backward ---------------------------------------------------
@pytest.mark.parametrize("op", ["conv2d", "conv_transpose2d"])
@pytest.mark.parametrize("stride,k", [(1, 3), (2, 4), (1, 2)])
def test_conv_float32_grads(op, stride, k):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 6, 6)).astype(np.float32)
    w = rng.standard_normal((3, 4, k, k) if op == "conv_transpose2d" else (4, 3, k, k)).astype(np.float32)
    b = rng.standard_normal(4).astype(np.float32)
    y, cache = getattr(F, op + "_forward")(x, w, b, stride, 1)
    grads = getattr(F, op + "_backward")(rng.standard_normal(y.shape).astype(np.float32), cache)
    assert y.dtype == np.float32 and all(g.dtype == np.float32 for g in grads)
    assert [g.shape for g in grads] == [x.shape, w.shape, b.shape]


# --- group norm ---------------------------------------------------------------------------------
@st.composite
def norm_case(draw):
    G, per = draw(st.integers(1, 4)), draw(small)
    spatial = draw(st.lists(st.integers(1, 4), min_size=0, max_size=2))
    return dict(shape=(draw(small), G * per, *spatial), G=G, seed=draw(st.integers(0, 2**31)))


@pytest.mark.parametrize("fused", [False, True])
@settings(max_examples=examples(30), deadline=None)
@given(c=norm_case())
def test_group_norm_grad(fused, c):
    rng = np.random.default_rng(c["seed"])
    C = c["shape"][1]
    x = 2 * rng.standard_normal(c["shape"]) + 1
    name = "group_norm_silu" if fused else "group_norm"
    fwd = lambda x, g, b: getattr(F, name + "_forward")(x, c["G"], g, b)
    check_grads(fwd, getattr(F, name + "_backward"),
                [x, rng.standard_normal(C), rng.standard_normal(C)], rng)


@settings(max_examples=examples(30), deadline=None)
@given(c=norm_case())
@example(c={"shape": (3, 2), "G": 1, "seed": 3791})   # two close values: x - mean rounds, then / std amplifies
def test_group_norm_statistics(c):
    # gamma = 1, beta = 0: each (sample, group) comes out with mean 0 and variance v / (v + eps)
    rng = np.random.default_rng(c["seed"])
    x = 3 * rng.standard_normal(c["shape"]) - 2
    C = c["shape"][1]
    y, _ = F.group_norm_forward(x, c["G"], np.ones(C), np.zeros(C), eps=1e-5)
    yg = y.reshape(c["shape"][0], c["G"], -1)
    v = x.reshape(yg.shape).var(axis=2)
    # xhat = (x - mean) / std: the rounding of x - mean (u |x|) is divided by std
    assert_zero(yg.mean(axis=2), np.abs(x).max() / np.sqrt(v.min() + 1e-5), name="group mean")
    assert_close(yg.var(axis=2), v / (v + 1e-5), name="group variance", **TOL[np.dtype(np.float64)])


@pytest.mark.parametrize("x", [np.ones((1, 2, 3)), np.arange(6.0).reshape(1, 2, 3) * 1e6])
def test_group_norm_known_values(x):
    # constant input -> y = beta; a huge offset/scale still normalises (two-pass variance)
    y, _ = F.group_norm_forward(x, 1, np.full(2, 2.0), np.full(2, 0.5))
    z = (x - x.mean()) / np.sqrt(x.var() + 1e-5)
    assert_close(y, 2 * z + 0.5, name="group norm", **TOL[np.dtype(np.float64)])


def test_group_norm_silu_is_the_composition():
    rng = np.random.default_rng(1)
    x, g, b = rng.standard_normal((2, 6, 3, 3)), rng.standard_normal(6), rng.standard_normal(6)
    y, cache = F.group_norm_silu_forward(x, 3, g, b)
    z, norm_cache = F.group_norm_forward(x, 3, g, b)
    ref, act_cache = F.silu_forward(z)
    assert_close(y, ref, name="forward", **TOL[np.dtype(np.float64)])
    dy = rng.standard_normal(y.shape)
    ref_grads = F.group_norm_backward(F.silu_backward(dy, act_cache), norm_cache)
    for got, want in zip(F.group_norm_silu_backward(dy, cache), ref_grads):
        assert_close(got, want, name="backward", **TOL[np.dtype(np.float64)])


@pytest.mark.parametrize("fused", [False, True])
def test_group_norm_float32(fused):
    rng = np.random.default_rng(0)
    x = (50 + rng.standard_normal((3, 8, 5, 5))).astype(np.float32)   # large mean: a one-pass variance would lose it
    g, b = rng.standard_normal(8).astype(np.float32), rng.standard_normal(8).astype(np.float32)
    name = "group_norm_silu" if fused else "group_norm"
    y, cache = getattr(F, name + "_forward")(x, 4, g, b)
    y64, cache64 = getattr(F, name + "_forward")(x.astype(np.float64), 4, g.astype(np.float64), b.astype(np.float64))
    dy = rng.standard_normal(y.shape)
    grads = getattr(F, name + "_backward")(dy.astype(np.float32), cache)
    grads64 = getattr(F, name + "_backward")(dy, cache64)
    assert y.dtype == np.float32 and all(gr.dtype == np.float32 for gr in grads)
    assert_close(y, y64, name="float32 forward", **TOL[np.dtype(np.float32)])
    for got, want in zip(grads, grads64):
        assert_close(got, want, name="float32 backward", **TOL[np.dtype(np.float32)])   # sums of 75 terms of O(1)


# --- max pool -------------------------------------------------------------------------------------
@settings(max_examples=examples(30), deadline=None)
@given(B=small, C=small, H=st.integers(1, 7), W=st.integers(1, 7), k=st.integers(1, 3),
       stride=st.one_of(st.none(), st.integers(1, 3)), seed=st.integers(0, 2**31))
def test_max_pool2d_grad(B, C, H, W, k, stride, seed):
    if H < k or W < k:
        with pytest.raises(ValueError, match="kernel_size"):
            F.max_pool2d_forward(np.zeros((B, C, H, W)), k, stride)
        return
    rng = np.random.default_rng(seed)
    # distinct values 1/n apart (FD never crosses a tie), and O(1) so that the FD's own
    # rounding error, eps |L| / h, stays far below the gradients
    x = rng.permutation(B * C * H * W).reshape(B, C, H, W) / (B * C * H * W)
    s = k if stride is None else stride
    y, _ = F.max_pool2d_forward(x, k, stride)
    assert y.shape == (B, C, (H - k) // s + 1, (W - k) // s + 1)
    for r in range(y.shape[2]):
        for c in range(y.shape[3]):
            assert_close(y[:, :, r, c], x[:, :, r * s:r * s + k, c * s:c * s + k].max(axis=(2, 3)),
                         rtol=0, atol=0, name="window max")
    check_grads(lambda x: F.max_pool2d_forward(x, k, stride), F.max_pool2d_backward, [x], rng)


def test_max_pool2d_ties_go_to_the_first_max():
    x = np.zeros((1, 1, 4, 4), dtype=np.float32)
    y, cache = F.max_pool2d_forward(x, 2)
    dx = F.max_pool2d_backward(np.ones_like(y), cache)
    expect = np.zeros((4, 4), dtype=np.float32)
    expect[::2, ::2] = 1
    assert dx.dtype == np.float32
    np.testing.assert_array_equal(dx[0, 0], expect)


# --- bad arguments ----------------------------------------------------------------------------------
@pytest.mark.parametrize("call, match", [
    (lambda: F.conv2d_forward(np.zeros((1, 2, 5, 5)), np.zeros((3, 4, 3, 3)), None), "channels"),
    (lambda: F.conv2d_forward(np.zeros((2, 5, 5)), np.zeros((3, 2, 3, 3)), None), r"\(B, C, H, W\)"),
    (lambda: F.conv2d_forward(np.zeros((1, 2, 5, 5)), np.zeros((3, 2, 3, 3)), np.zeros(2)), "bias"),
    (lambda: F.conv2d_forward(np.zeros((1, 2, 2, 2)), np.zeros((3, 2, 5, 5)), None), "larger"),
    (lambda: F.conv2d_forward(np.zeros((1, 2, 5, 5)), np.zeros((3, 2, 3, 3)), None, stride=0), "stride"),
    (lambda: F.conv2d_forward(np.zeros((1, 2, 5, 5)), np.zeros((3, 2, 3, 3)), None, padding=-1), "padding"),
    (lambda: F.conv2d_forward(np.zeros((1, 2, 5, 5)), np.zeros((3, 2, 3, 3)), None, stride=1.5), "stride"),
    (lambda: F.conv_transpose2d_forward(np.zeros((1, 2, 5, 5)), np.zeros((3, 2, 3, 3)), None), "channels"),
    (lambda: F.conv_transpose2d_forward(np.zeros((1, 2, 1, 1)), np.zeros((2, 2, 2, 2)), None, 1, 1), "output size"),
    (lambda: F.group_norm_forward(np.zeros((1, 6, 2)), 4, np.ones(6), np.zeros(6)), "divisor"),
    (lambda: F.group_norm_forward(np.zeros((1, 6, 2)), 3, np.ones(5), np.zeros(6)), "gamma"),
    (lambda: F.max_pool2d_forward(np.zeros((1, 1, 4, 4)), 0), "kernel_size"),
])
def test_bad_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize("op", ["conv2d", "conv_transpose2d"])
def test_naive_loops_defaults_dtype_and_errors(op):
    """The naive loops (the spelled-out definitions the fast ops are checked against) take
    stride 1, padding 0 by default, keep float32 in float32, add the bias, and name
    themselves in their errors."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 5, 5)).astype(np.float32)
    w = rng.standard_normal((4, 3, 3, 3) if op == "conv2d" else (3, 4, 3, 3)).astype(np.float32)
    b = rng.standard_normal(4).astype(np.float32)
    naive = getattr(F, op + "_naive_forward")
    y, _ = naive(x, w, b)
    y_explicit, _ = naive(x, w, b, 1, 0)
    assert y.dtype == np.float32 and np.array_equal(y, y_explicit)
    assert_close(y, getattr(F, op + "_forward")(x, w, b, 1, 0)[0], name=op, **TOL[np.dtype(np.float32)])
    y_nobias, _ = naive(x, w, None)
    assert_close(y - y_nobias, np.broadcast_to(b[:, None, None], y.shape[1:])[None].repeat(2, 0), name="bias",
                 **TOL[np.dtype(np.float32)])
    with pytest.raises(ValueError, match=op + ": bias must have shape"):
        naive(x, w, b[:3])
    with pytest.raises(ValueError, match=op + ":"):
        naive(x[:, :2], w, b)
    if op == "conv2d":
        with pytest.raises(ValueError, match="conv2d: kernel 3 larger than the padded input 2"):
            naive(x[:, :, :2, :], w, b)
        with pytest.raises(ValueError, match="conv2d: kernel 3 larger than the padded input 2"):
            naive(x[:, :, :, :2], w, b)
