"""Version 1 of the numba max_pool2d, silu and group_norm on channel-major views ((C, B, H, W) buffers seen as
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


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_silu_and_group_norm_v1_on_a_channel_major_view(dtype):
    """The layout version 2's convolutions hand to the next op, built here by a transpose (the
    kernels' mutation run executes the kernels as Python, where version 2's in-kernel BLAS calls
    cannot run): version 1 and the reference give the values they give on a contiguous copy."""
    v1, ref = rc.get_backend("numba", versions=1), rc.get_backend("numpy")
    rng = np.random.default_rng(5)
    y = (2 * rng.standard_normal((6, 3, 5, 5))).astype(dtype).swapaxes(0, 1)   # NCHW view of (C, B)
    assert not y.flags.c_contiguous
    yc = np.ascontiguousarray(y)
    gamma, beta = rng.standard_normal(6).astype(dtype), rng.standard_normal(6).astype(dtype)
    tol = TOL[np.dtype(dtype)]
    for be in (v1, ref):
        assert_agree(be.silu_forward(y)[0], F.silu_forward(yc)[0], tol, f"{be.name} silu")
        assert_agree(be.group_norm_forward(y, 2, gamma, beta)[0], F.group_norm_forward(yc, 2, gamma, beta)[0],
                     tol, f"{be.name} group_norm")
