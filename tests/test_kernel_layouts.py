"""Version 1 of the numba max_pool2d on channel-major views ((C, B, H, W) buffers seen as
NCHW, which version 2 of the convolutions returns): the same values and gradients as the
reference on a C-contiguous copy (gradients to rounding where windows overlap), and the layout kept (a channel-major view in, a
channel-major view out). Small enough for the kernels' mutation run (tests/mutation/kernels.cfg)."""
import numpy as np
import pytest

pytest.importorskip("numba", reason="the numba backend needs numba (pip install 'refdiff[numba]')")

import refdiff_cuda as rc  # noqa: E402
from refdiff.nn import functional as F  # noqa: E402
from refdiff_cuda.testing import TOL, assert_agree  # noqa: E402


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("k, s", [(2, None), (3, 2)])
def test_max_pool2d_v1_on_a_channel_major_view(dtype, k, s):
    v1 = rc.get_backend("numba", versions=1)
    rng = np.random.default_rng(4)
    B, C, H, W = 3, 2, 7, 6
    x = rng.standard_normal((C, B, H, W)).astype(dtype).swapaxes(0, 1)        # NCHW view of a (C, B) buffer
    assert not x.flags.c_contiguous
    y, cache = v1.max_pool2d_forward(x, k, s)
    y_ref, cache_ref = F.max_pool2d_forward(np.ascontiguousarray(x), k, s)
    np.testing.assert_array_equal(y, y_ref)
    assert y.swapaxes(0, 1).flags.c_contiguous, "a channel-major input gives a channel-major output"
    dy = rng.standard_normal((C, B) + y.shape[2:]).astype(dtype).swapaxes(0, 1)
    dx = v1.max_pool2d_backward(dy, cache)
    # overlapping windows (k > s) add into a pixel in another order than the reference: rounding
    assert_agree(dx, F.max_pool2d_backward(np.ascontiguousarray(dy), cache_ref), TOL[np.dtype(dtype)], "dx")
    assert dx.shape == x.shape and dx.swapaxes(0, 1).flags.c_contiguous
    # and a C-contiguous input stays C-contiguous
    xc = np.ascontiguousarray(x)
    yc, cache_c = v1.max_pool2d_forward(xc, k, s)
    np.testing.assert_array_equal(yc, y_ref)
    assert yc.flags.c_contiguous
    np.testing.assert_array_equal(v1.max_pool2d_backward(np.ascontiguousarray(dy), cache_c), dx)
