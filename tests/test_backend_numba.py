"""numba (CPU) backend, what is particular to its kernels: each conv path is taken where its
docstring says and agrees with the reference, the SIMD micro-kernels against plain products,
non-finite inputs, byte order, channel-major views, the polyphase map; and that check_op can
fail. Every op and version against the reference, the golden run and the model API are in
test_backend_ops.py (all backends)."""
import numpy as np
import pytest

pytest.importorskip("numba", reason="the numba backend needs numba (pip install 'refdiff[numba]')")

import refdiff_cuda as rc  # noqa: E402
from refdiff_cuda.testing import TOL, assert_agree, check_op  # noqa: E402

BACKEND = rc.get_backend("numba")


def test_channel_major_views_are_accepted_everywhere():
    """v2 returns NCHW views of (C, B, H, W) buffers; v1 ops and the reference take them too."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 4, 5, 5)).astype(np.float32)
    w = rng.standard_normal((6, 4, 3, 3)).astype(np.float32)
    y2, _ = BACKEND.conv2d_forward(x, w, None, 1, 1)
    assert y2.shape == (3, 6, 5, 5) and not y2.flags.c_contiguous
    v1 = rc.get_backend("numba", versions=1)
    ref = rc.get_backend("numpy")
    y2c = np.ascontiguousarray(y2)
    for be in (v1, ref, BACKEND):
        assert_agree(be.silu_forward(y2)[0], ref.silu_forward(y2c)[0], TOL[np.dtype(np.float32)], be.name)
        one, zero = np.ones(6, np.float32), np.zeros(6, np.float32)
        assert_agree(be.group_norm_forward(y2, 2, one, zero)[0], ref.group_norm_forward(y2c, 2, one, zero)[0],
                     TOL[np.dtype(np.float32)], be.name)


def test_check_op_catches_a_wrong_kernel():
    """The harness can fail: a conv whose input gradient is off by 0.1 % is caught, by name."""
    import types
    good = BACKEND.conv2d_backward

    def bad(dy, cache):
        dx, dw, db = good(dy, cache)
        return dx * 1.001, dw, db
    broken = types.SimpleNamespace(**{**vars(BACKEND), "conv2d_backward": bad})
    rng = np.random.default_rng(0)
    args = [rng.standard_normal((2, 3, 5, 5)), rng.standard_normal((4, 3, 3, 3)), None]
    with pytest.raises(AssertionError, match=r"conv2d \[numba v\d\] gradient 0"):
        check_op("conv2d", broken, args, np.float32, dict(stride=1, padding=1))


@pytest.mark.parametrize("shape, w_shape, stride, padding, path", [
    ((3, 4, 28, 28), (5, 4, 3, 3), 1, 1, "wide"),     # unet-seed's 28 x 28 layers (odd channel counts)
    ((2, 3, 7, 9), (4, 3, 3, 2), 1, 0, "wide"),       # non-square kernel, no padding
    ((2, 6, 3, 3), (5, 6, 3, 3), 1, 1, "dense"),      # unet-seed's 3 x 3 stage
    ((2, 6, 1, 1), (5, 6, 3, 3), 1, 1, "dense"),      # its 1 x 1 mid stage: only the centre tap
    ((2, 3, 3, 3), (4, 3, 4, 4), 2, 1, "dense"),      # the 3 -> 1 downsample
    ((2, 3, 7, 7), (4, 3, 4, 4), 2, 1, "strided"),    # stride 2: v4 runs version 2, v5 the polyphase conv
    ((2, 3, 16, 15), (4, 3, 4, 4), 2, 1, "strided"),  # unet-seed's 28 -> 14 downsample, smaller
    ((2, 3, 11, 10), (4, 3, 3, 2), 3, 2, "v2"),       # stride 3 not dividing the kernel: version 2
    ((2, 5, 14, 13), (6, 5, 3, 3), 2, 1, "v2"),       # unet-ddpm's 3 x 3 stride-2 downsample: version 2
    ((2, 3, 11, 13), (4, 3, 3, 6), 3, 2, "strided"),  # stride 3 dividing a non-square kernel, odd sizes
    ((2, 3, 5, 5), (2, 3, 2, 2), 1, 2, "v2"),         # padding > k - 1: version 2 in both
    ((2, 17, 5, 6), (19, 17, 3, 3), 1, 1, "wide"),    # v5: channel blocks of 8, 8, 3 and 8, 8, 1 (dx)
    ((2, 3, 12, 13), (7, 3, 3, 3), 1, 1, "wide"),     # v5: SIMD dw (>= 128 wide pixels), 7 -> 8 rows, 27 -> 30 taps
])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("version", [4, 5])
def test_conv2d_v4_v5_paths(shape, w_shape, stride, padding, path, dtype, version):
    """Each of conv2d v4's three paths (v5: "simd" for v4's "wide", v4's own dense path) is
    taken where its docstring says, and agrees with the reference."""
    be = rc.get_backend("numba", versions={"conv2d": version})
    rng = np.random.default_rng(1)
    x, w, b = rng.standard_normal(shape), rng.standard_normal(w_shape), rng.standard_normal(w_shape[0])
    _, cache = be.conv2d_forward(x.astype(dtype), w.astype(dtype), b.astype(dtype), stride, padding)
    path = ({"wide": "simd", "dense": "v4", "strided": "poly"} if version == 5 else {"strided": "v2"}).get(path, path)
    assert cache[0] == path
    check_op("conv2d", be, [x, w, b], dtype, dict(stride=stride, padding=padding))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("MR, K, npix", [(1, 1, 1), (3, 5, 17), (8, 90, 840), (5, 2, 33)])
def test_simd_kernel_is_a_gemm(dtype, MR, K, npix):
    """The LLVM IR micro-kernel: y[r, n] = sum_k w[r, k] x[off[k] + n], whole vectors written,
    against a float64 NumPy product (any offsets, including overlapping and unsorted ones)."""
    from refdiff_cuda.numba_cpu import _simd
    from refdiff_cuda.numba_cpu.conv_v5 import NV
    rng = np.random.default_rng(MR * 1000 + K)
    L = _simd.LANES[np.dtype(dtype)] * NV
    npad = -(-npix // L) * L
    x = rng.standard_normal(50 + npad).astype(dtype)
    off = rng.integers(0, 50, K).astype(np.int64)
    w = rng.standard_normal((MR, K)).astype(dtype)
    y = np.full((MR, npad), np.nan, dtype)
    _simd.call(MR, NV, x, off, K, w, K, y, npad, npix)
    ref = w.astype(np.float64) @ np.stack([x[o:o + npad] for o in off]).astype(np.float64)
    assert_agree(y, ref, TOL[np.dtype(dtype)], f"simd kernel MR={MR} K={K} npix={npix}")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("ns, npix", [(1, 1), (3, 40), (2, 64)])
def test_simd_dw_kernel_is_a_sum_over_samples(dtype, ns, npix):
    """The weight-gradient micro-kernel: dw[r, j] += sum_s sum_n dy[r, s, n] x[off[j] + s sx + n]."""
    from refdiff_cuda.numba_cpu import _simd
    from refdiff_cuda.numba_cpu.conv_v5 import DK, DR
    rng = np.random.default_rng(ns * 100 + npix)
    L = _simd.LANES[np.dtype(dtype)]
    npad, sx = -(-npix // L) * L, 70
    dy = rng.standard_normal((DR, ns, npad)).astype(dtype)
    x = rng.standard_normal(ns * sx + 50 + npad).astype(dtype)
    off = rng.integers(0, 50, DK).astype(np.int64)
    dw = rng.standard_normal((DR, DK)).astype(dtype)
    cols = np.stack([np.concatenate([x[o + s * sx:o + s * sx + npad] for s in range(ns)]) for o in off])
    ref = dw.astype(np.float64) + dy.reshape(DR, -1).astype(np.float64) @ cols.astype(np.float64).T
    f = _simd.DW_SIG(_simd.dw_kernel(DR, DK, np.dtype(dtype)))
    f(dy.ctypes.data, ns * npad, x.ctypes.data, off.ctypes.data, dw.ctypes.data, DK, npix, ns, npad, sx)
    assert_agree(dw, ref, TOL[np.dtype(dtype)], f"simd dw kernel ns={ns} npix={npix}")


@pytest.mark.parametrize("scale", [1e-3, 1.0, 30.0, 1e3])
def test_silu_v3_kernel_and_tail(scale):
    """silu v3 on a size that is not a multiple of 16 (kernel body + scalar tail), with
    NaN, +-inf, +-0 and values where exp(-x) overflows, against the reference."""
    be = rc.get_backend("numba", versions={"silu": 3})
    rng = np.random.default_rng(int(scale * 7))
    x = rng.standard_normal((3, 5, 33, 7)) * scale
    flat = x.reshape(-1)
    flat[[0, 17, 100, -1, -2, -3, -9]] = [np.nan, np.inf, -np.inf, 0.0, -0.0, -100.0, 100.0]
    with np.errstate(invalid="ignore"):        # the reference's -inf x 0 and inf - inf: expected NaNs
        check_op("silu", be, [x], np.float32)
    y, _ = be.silu_forward(x.astype(np.float32))
    assert np.isnan(y.reshape(-1)[[0, 100]]).all() and y.reshape(-1)[17] == np.inf


@pytest.mark.parametrize("shape, w_shape, stride, padding, path", [
    ((3, 4, 14, 14), (4, 5, 4, 4), 2, 1, "up"),       # unet-seed's 14 -> 28 upsample
    ((2, 3, 1, 1), (3, 6, 4, 4), 2, 1, "up"),         # 1 -> 2: conv2d's dense path underneath
    ((2, 3, 3, 3), (3, 4, 4, 4), 2, 1, "v2"),         # 3 -> 6: version 2 (measured faster)
    ((2, 3, 5, 4), (3, 2, 3, 3), 1, 0, "up"),         # stride 1: no zeros inserted
    ((2, 3, 15, 14), (3, 2, 3, 2), 2, 1, "v2"),       # non-square kernel: version 2
])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_conv_transpose2d_v3_paths(shape, w_shape, stride, padding, path, dtype):
    """conv_transpose2d v3 takes the upsample route where its docstring says, and agrees."""
    be = rc.get_backend("numba", versions={"conv_transpose2d": 3})
    rng = np.random.default_rng(2)
    x, w, b = rng.standard_normal(shape), rng.standard_normal(w_shape), rng.standard_normal(w_shape[1])
    _, cache = be.conv_transpose2d_forward(x.astype(dtype), w.astype(dtype), b.astype(dtype), stride, padding)
    assert cache[0] == path
    check_op("conv_transpose2d", be, [x, w, b], dtype, dict(stride=stride, padding=padding))


def _inf_at(shape, index, seed=0):
    a = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    a[index] = np.inf
    return a


def _dy_inf(y):
    d = np.ones_like(y)
    d.reshape(-1)[d.size // 3] = np.inf
    return d


@pytest.mark.parametrize("op, x, w, stride, padding, dy", [
    # an inf pixel read only by garbage columns of the wide frame (stride 1, no padding)
    ("conv2d", _inf_at((2, 1, 6, 6), (1, 0, 0, 0)), np.ones((1, 1, 3, 3), np.float32), 1, 0, None),
    # the dense path's structural zeros (3 x 3 image)
    ("conv2d", _inf_at((1, 1, 3, 3), (0, 0, 2, 2)), np.ones((1, 1, 3, 3), np.float32), 1, 1, None),
    # strided (4 x 4 and 3 x 3, stride 2: v5's polyphase and version-2 paths, v7's frame): inf in x,
    # in w, then in dy
    ("conv2d", _inf_at((2, 3, 16, 16), (0, 1, 5, 7)), np.ones((4, 3, 4, 4), np.float32), 2, 1, None),
    ("conv2d", _inf_at((1, 1, 4, 4), (0, 0, 1, 1)), np.ones((1, 1, 3, 3), np.float32), 2, 1, None),
    ("conv2d", np.ones((2, 3, 9, 9), np.float32), _inf_at((4, 3, 3, 3), (1, 2, 0, 1)), 2, 1, None),
    ("conv2d", np.ones((2, 3, 10, 4), np.float32), _inf_at((4, 3, 2, 2), (1, 2, 0, 0)), 2, 1, None),
    ("conv2d", np.ones((2, 3, 9, 9), np.float32), np.ones((4, 3, 3, 3), np.float32), 2, 1, _dy_inf),
    ("conv2d", np.ones((2, 3, 16, 16), np.float32), np.ones((4, 3, 4, 4), np.float32), 2, 1, _dy_inf),
    ("conv2d", np.ones((2, 3, 9, 9), np.float32), np.ones((4, 3, 3, 3), np.float32), 1, 1, _dy_inf),
    ("conv2d", _inf_at((2, 3, 9, 9), (1, 2, 4, 4)) * np.nan, np.ones((4, 3, 3, 3), np.float32), 1, 1, None),
    # conv_transpose2d v3: inserted zeros times an inf weight, and times an inf in dy
    ("conv_transpose2d", np.ones((2, 3, 14, 14), np.float32), _inf_at((3, 3, 4, 4), (0, 0, 1, 2)), 2, 1, None),
    ("conv_transpose2d", np.ones((2, 3, 7, 7), np.float32), np.ones((3, 4, 4, 4), np.float32), 2, 1, _dy_inf),
])
@pytest.mark.parametrize("conv_version", [5, 6, 7])
def test_nonfinite_inputs_give_the_references_nan_and_inf(op, x, w, stride, padding, dy, conv_version):
    """The fast paths multiply zeros the reference does not (and the reference multiplies its own
    frame's garbage columns), so with an inf among the inputs 0 x inf lands elsewhere; such
    results are recomputed by the literal port, and NaN / inf come out where the reference's do
    (assert_agree compares the non-finite pattern exactly). conv2d at each of its SIMD versions."""
    from refdiff.nn import functional as F
    be = rc.get_backend("numba", versions={"conv2d": conv_version})
    with np.errstate(all="ignore"):
        y0, c0 = getattr(F, op + "_forward")(x, w, None, stride, padding)
        y1, c1 = getattr(be, op + "_forward")(x, w, None, stride, padding)
        d = np.ones_like(y0) if dy is None else dy(y0)
        g0, g1 = getattr(F, op + "_backward")(d, c0), getattr(be, op + "_backward")(d, c1)
        tol = TOL[np.dtype(np.float32)]
        assert_agree(y1, y0, tol, f"{op} y")
        assert_agree(g1[0], g0[0], tol, f"{op} dx")
        assert_agree(g1[1], g0[1], tol, f"{op} dw")


def test_conv2d_v5_rejects_a_kernel_larger_than_the_input():
    """The stride-1 SIMD path checks the output size as the reference does (it used to run the
    kernel on an empty output and write past it)."""
    x, w = np.ones((2, 3, 2, 20), np.float32), np.ones((4, 3, 3, 3), np.float32)
    for be in (rc.get_backend("numba", versions={"conv2d": 5}), rc.get_backend("numpy")):
        with pytest.raises(ValueError, match="kernel 3 larger than the padded input"):
            be.conv2d_forward(x, w, None, 1, 0)


def test_non_native_byte_order_is_accepted():
    """Big-endian input (e.g. read from a file) works as in the reference."""
    x = np.random.default_rng(0).standard_normal((2, 3, 9, 9)).astype(">f4")
    w = np.ones((2, 3, 3, 3), np.float32)
    ref = rc.get_backend("numpy")
    assert_agree(BACKEND.conv2d_forward(x, w, None, 1, 1)[0], ref.conv2d_forward(x, w, None, 1, 1)[0],
                 TOL[np.dtype(np.float32)], "conv2d >f4")
    assert_agree(BACKEND.silu_forward(x)[0], ref.silu_forward(x)[0], TOL[np.dtype(np.float32)], "silu >f4")
    x8 = x.astype(">f8")                         # silu v3 hands float64 to version 2
    assert_agree(BACKEND.silu_forward(x8)[0], ref.silu_forward(x8)[0], TOL[np.dtype(np.float64)], "silu >f8")


def test_polyphase_map_is_the_slicing_and_its_adjoint():
    """conv2d v5's _to_phases against its definition by slicing (xq[(c, py, px)] = xpad[c, :,
    py::s, px::s]), and _from_phases as its adjoint (<to(x), y> = <x, from(y)>), on random
    shapes, strides and paddings, including phases that keep none of the image."""
    from refdiff_cuda.numba_cpu.conv_v5 import _from_phases, _to_phases
    rng = np.random.default_rng(3)
    for _ in range(60):
        C, B, H, W = (int(v) for v in rng.integers(1, 9, 4) % np.array([3, 3, 9, 9]) + 1)
        s, p, Hq, Wq = int(rng.integers(1, 4)), int(rng.integers(0, 3)), int(rng.integers(1, 6)), int(rng.integers(1, 6))
        x = rng.standard_normal((C, B, H, W))
        xpad = np.zeros((C, B, p + H + (Hq + 1) * s, p + W + (Wq + 1) * s))
        xpad[:, :, p:p + H, p:p + W] = x
        ref = np.stack([xpad[c, :, py::s, px::s][:, :Hq, :Wq] for c in range(C) for py in range(s) for px in range(s)])
        xq = _to_phases(x, s, p, Hq, Wq)
        np.testing.assert_array_equal(xq, ref)
        y = rng.standard_normal(xq.shape)
        np.testing.assert_allclose((xq * y).sum(), (x * _from_phases(y, s, p, H, W)).sum(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape, w_shape, stride, padding, kind", [
    ((2, 5, 14, 13), (6, 5, 3, 3), 2, 1, "phases"),   # unet-ddpm's 3 x 3 stride-2 downsample, odd width
    ((3, 4, 7, 7), (5, 4, 3, 3), 2, 1, "phases"),     # 7 -> 4
    ((2, 3, 11, 10), (4, 3, 3, 2), 3, 2, "phases"),   # stride 3, non-square kernel not divisible by it
    ((2, 3, 9, 9), (4, 3, 1, 1), 2, 0, "phases"),     # 1 x 1 at stride 2: three phases with no taps
    ((1, 2, 5, 6), (3, 2, 2, 3), 3, 0, "phases"),     # kernel smaller than the stride in one direction
    ((2, 3, 16, 15), (4, 3, 4, 4), 2, 1, "poly"),     # s divides k: version 5's backward
    ((2, 3, 11, 13), (4, 3, 3, 6), 3, 2, "poly"),
    ((2, 3, 9, 9), (4, 3, 3, 3), 1, 1, "v6"),         # stride 1: version 6
    ((2, 3, 3, 3), (4, 3, 4, 4), 2, 1, "v6"),         # image no larger than the kernel: the dense path
])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_conv2d_v7_paths(shape, w_shape, stride, padding, kind, dtype):
    """conv2d v7 takes strided convs through its one-pass polyphase frame (backward tap by tap
    unless s divides k), everything else to version 6, and agrees with the reference."""
    be = rc.get_backend("numba", versions={"conv2d": 7})
    rng = np.random.default_rng(2)
    x, w, b = rng.standard_normal(shape), rng.standard_normal(w_shape), rng.standard_normal(w_shape[0])
    _, cache = be.conv2d_forward(x.astype(dtype), w.astype(dtype), b.astype(dtype), stride, padding)
    assert cache[0] == kind
    check_op("conv2d", be, [x, w, b], dtype, dict(stride=stride, padding=padding))
    check_op("conv2d", be, [x, w, None], dtype, dict(stride=stride, padding=padding))


@pytest.mark.parametrize("C, B, H, W, s, p, k", [(3, 2, 9, 8, 2, 1, 3), (2, 3, 28, 28, 2, 1, 4), (2, 2, 11, 10, 3, 2, 3),
                                                 (1, 1, 5, 5, 2, 0, 1)])
def test_phase_planes_are_version_5s_two_passes(C, B, H, W, s, p, k):
    """conv2d v7's _phase_planes writes, in one pass, what v5's _to_phases then _pad_planes write
    (every entry: the zeros of the padding and past the image's edge, and the slack), and says
    whether x is finite."""
    from refdiff_cuda.numba_cpu import conv_v5, conv_v7
    x = np.random.default_rng(3).standard_normal((C, B, H, W)).astype(np.float32)
    kq = -(-k // s)
    Hq, Wq = (H + 2 * p - k) // s + kq, (W + 2 * p - k) // s + kq
    two = conv_v5._pad_planes(conv_v5._to_phases(x, s, p, Hq, Wq), 0, 0, 40)
    xq, finite = conv_v7._phase_planes(x, s, p, Hq, Wq, 40)
    np.testing.assert_array_equal(xq, two)
    assert finite
    for bad in (np.inf, -np.inf, np.nan):          # the finiteness taken in the same pass, any entry
        y = x.copy()
        y[-1, -1, -1, -1] = bad
        assert not conv_v7._phase_planes(y, s, p, Hq, Wq, 40)[1]


def test_conv2d_v7_leaves_other_dtypes_to_version_6():
    """A dtype the SIMD kernels lack (float16) takes version 6's route on the strided path too: the
    kernel functions themselves (the backend names the dtype over both) end the same way, not with
    a KeyError from the SIMD kernels' table."""
    from refdiff_cuda.numba_cpu import conv_v6, conv_v7
    x, w = np.ones((2, 3, 8, 8), np.float16), np.ones((4, 3, 3, 3), np.float16)
    outcomes = []
    for f in (conv_v6.conv2d_forward_v6, conv_v7.conv2d_forward_v7):
        try:
            y, _ = f(x, w, None, 2, 1)
            outcomes.append(("ok", y.dtype, y.shape))
        except Exception as exc:                 # whatever version 6 does, version 7 does
            outcomes.append((type(exc).__name__,))
    assert outcomes[0] == outcomes[1] and outcomes[0] != ("KeyError",)


@pytest.mark.parametrize("s, p, Ho, Wo", [(2, 1, 28, 28), (2, 1, 6, 7), (2, 0, 5, 4), (3, 2, 7, 8), (3, 0, 6, 6)])
def test_convt_v4_scatter_is_the_phase_slicing_and_gather_its_adjoint(s, p, Ho, Wo):
    """conv_transpose2d v4's _scatter (the s^2 phases of Z into y) against its definition by slicing,
    y[:, :, o0::s, q0::s] = Z[ry, rx, :, :, m0:, n0:] for each phase (u = o + p = s m + r), and
    _gather as its adjoint, <scatter(Z), dy> = <Z, gather(dy)>; both flags (NaN in y, dy finite)."""
    from refdiff_cuda.numba_cpu import convt_v4
    rng = np.random.default_rng(5)
    Zh, Zw = (Ho + p) // s + 2, (Wo + p) // s + 2
    Zc = rng.standard_normal((s, s, 3, 2, Zh, Zw))
    ref = np.empty((3, 2, Ho, Wo))
    for ry in range(s):
        for rx in range(s):
            m0, n0 = -(-(p - ry) // s), -(-(p - rx) // s)        # first m with s m + ry - p >= 0
            o0, q0 = s * m0 + ry - p, s * n0 + rx - p
            n_o, n_q = len(range(o0, Ho, s)), len(range(q0, Wo, s))
            ref[:, :, o0::s, q0::s] = Zc[ry, rx, :, :, m0:m0 + n_o, n0:n0 + n_q]
    y = np.empty_like(ref)
    assert not convt_v4._scatter(Zc, s, p, y)
    np.testing.assert_array_equal(y, ref)
    dy = rng.standard_normal(y.shape)
    dZ = np.full_like(Zc, np.nan)
    assert convt_v4._gather(dy, s, p, dZ)
    assert np.isfinite(dZ).all()                             # every entry written, 0 where no output reads
    np.testing.assert_allclose(np.sum(y * dy), np.sum(Zc * dZ), rtol=1e-12)
    Zc[1, 1, 2, 1, 1, 1] = np.nan                            # read by an output pixel: flagged
    assert convt_v4._scatter(Zc, s, p, y)
    for bad in (np.inf, np.nan):
        d = dy.copy()
        d[2, 1, Ho - 1, Wo - 1] = bad
        assert not convt_v4._gather(d, s, p, dZ)


@pytest.mark.parametrize("dtype", [np.float16])
@pytest.mark.parametrize("op, args", [
    ("conv2d_forward", lambda a: (a((2, 4, 8, 8)), a((4, 4, 3, 3)), None, 2, 1)),
    ("conv2d_forward", lambda a: (a((2, 4, 8, 8)), a((4, 4, 3, 3)), None, 1, 1)),
    ("silu_forward", lambda a: (a((2, 4, 8, 8)),)),
    ("group_norm_forward", lambda a: (a((2, 4, 8, 8)), 2, a((4,)), a((4,)))),
    ("conv2d_silu_forward", lambda a: (a((2, 4, 8, 8)), a((4, 4, 3, 3)), None, 1, 1)),
])
def test_a_dtype_the_kernels_lack_is_one_error_naming_it(op, args, dtype):
    """float16 arrays, which the kernels are not compiled for, give one TypeError naming the op
    and the dtype (the kernels' own errors named neither: a KeyError, numba's
    NotImplementedError)."""
    a = lambda shape: np.ones(shape, dtype)                   # noqa: E731
    with pytest.raises(TypeError, match=rf"numba backend: {op} takes float32 or float64 arrays; got {np.dtype(dtype)}"):
        getattr(BACKEND, op)(*args(a))


def test_dtype_naming_leaves_other_errors_and_working_ops_alone():
    """A float32 shape error is the op's own; an op that works on float16 (concat, a copy) still does."""
    with pytest.raises(ValueError, match="x has 3 channels"):
        BACKEND.conv2d_forward(np.ones((2, 3, 8, 8), np.float32), np.ones((4, 5, 3, 3), np.float32), None, 1, 1)
    y, _ = BACKEND.concat_forward([np.ones((2, 3, 4, 4), np.float16)] * 2, axis=1)
    assert y.dtype == np.float16 and y.shape == (2, 6, 4, 4)
