"""conv2d version 6 of the numba backend (refdiff_cuda/numba_cpu/conv_v6.py): 1x1 convs
(stride 1, no padding) as one GEMM on the channel-major buffer, every other conv by version 5.
Agreement with the reference at unet-ddpm's 1x1 shapes (residual skips, attention's q/k/v and
output projections), on NCHW arrays and the channel-major views convs return; the path each
conv takes; NaN and inf where the reference puts them. Random shapes of every version are in
test_backend_ops.py."""
import numpy as np
import pytest

pytest.importorskip("numba", reason="the numba backend needs numba (pip install 'refdiff[numba]')")

import refdiff_cuda as rc  # noqa: E402
from refdiff.nn import functional as F  # noqa: E402
from refdiff_cuda.testing import TOL, assert_agree, check_op  # noqa: E402

V6 = rc.get_backend("numba", versions={"conv2d": 6})
# (B, Cin, H, Cout): unet-ddpm's 1x1 convs at batch 4 (28 x 28: skip 96 -> 32; 7 x 7: q/k/v 64 -> 192,
# output projection 64 -> 64), and size-1 edges.
SHAPES = [(4, 96, 28, 32), (4, 64, 7, 192), (4, 64, 7, 64), (1, 1, 1, 1), (3, 5, 2, 1)]


def _channel_major(x):
    return np.ascontiguousarray(x.swapaxes(0, 1)).swapaxes(0, 1)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", SHAPES, ids=[str(s) for s in SHAPES])
def test_1x1_conv_agrees_in_both_layouts(shape, dtype):
    B, Cin, H, Cout = shape
    rng = np.random.default_rng(0)
    x, w, b = rng.standard_normal((B, Cin, H, H)), rng.standard_normal((Cout, Cin, 1, 1)), rng.standard_normal(Cout)
    for a in (x, _channel_major(x)):
        for bias in (b, None):
            check_op("conv2d", V6, [a, w, bias], dtype, dict(stride=1, padding=0))


@pytest.mark.parametrize("k, stride, padding, path", [
    (1, 1, 0, "gemm"), (1, 1, 1, "v5"), (1, 2, 0, "v5"), (3, 1, 1, "v5"), (3, 2, 1, "v5")])
def test_only_1x1_stride_1_unpadded_convs_take_the_gemm(k, stride, padding, path):
    rng = np.random.default_rng(1)
    x, w = rng.standard_normal((2, 3, 6, 6)), rng.standard_normal((4, 3, k, k))
    y, cache = V6.conv2d_forward(x, w, None, stride, padding)
    assert cache[0] == path
    assert_agree(y, F.conv2d_forward(x, w, None, stride, padding)[0], TOL[np.dtype(np.float64)], f"k{k} s{stride}")


def test_nonfinite_inputs_land_where_the_references_do():
    """The GEMM multiplies exactly the reference's terms (its frame has no garbage columns at
    k = 1, p = 0): an inf in x and a zero weight give NaN in the same entries of y, dx and dw."""
    rng = np.random.default_rng(2)
    x, w = rng.standard_normal((2, 4, 5, 5)).astype(np.float32), rng.standard_normal((3, 4, 1, 1)).astype(np.float32)
    x[0, 1, 2, 3], x[1, 2, 0, 0], w[1, 1] = np.inf, np.nan, 0.0
    tol = TOL[np.dtype(np.float32)]
    with np.errstate(all="ignore"):
        y0, c0 = F.conv2d_forward(x, w, None, 1, 0)
        y1, c1 = V6.conv2d_forward(x, w, None, 1, 0)
        dy = rng.standard_normal(y0.shape).astype(np.float32)
        g0, g1 = F.conv2d_backward(dy, c0), V6.conv2d_backward(dy, c1)
        assert np.isnan(y0).any() and np.isinf(y0).any()
        assert_agree(y1, y0, tol, "y")
        assert_agree(g1[0], g0[0], tol, "dx")
        assert_agree(g1[1], g0[1], tol, "dw")
