"""conv2d version 6 (numba, CPU): version 5, with 1x1 convolutions (stride 1, no padding) as
one matrix product on the channel-major buffer. Twin of refdiff/nn/conv.py's conv2d.

A 1x1 conv is a GEMM on the (C, B, H, W) buffer seen as a (C, B H W) matrix, with no frame,
no padding and no garbage columns:

    Y  (Cout, B H W) = W (Cout, Cin) X (Cin, B H W) + b        forward
    dX (Cin, B H W)  = W^T dY                                  backward
    dW (Cout, Cin)   = dY X^T,   db = row sums of dY

The products are _blas.matmul_t / matmul_nt: single-threaded BLAS calls on numba's threads,
split over the B H W columns (or, for dW, over that summed axis, partials added after).
Version 5's SIMD kernel runs a 1x1 conv through its wide-row frame one sample at a time,
8 output channels per call, re-reading the input for each block of 8; unet-ddpm has 20 of
these convs per step (residual skips, attention's q/k/v and output projections).

These are the reference's products exactly (its frame for k = 1, p = 0 has no garbage
columns), so NaN and inf land where the reference's do. Every other conv is version 5's.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from refdiff.nn.conv import _check_conv

from ._blas import matmul, matmul_nt, matmul_t
from ._layout import cm, native, nchw
from .conv_v5 import conv2d_backward_v5, conv2d_forward_v5

_JIT = dict(cache=True, fastmath=False)


@njit(parallel=True, **_JIT)
def _add_row_bias(y, b):              # y (Cout, n) += b[:, None]
    for c in prange(y.shape[0]):
        bc = b[c]
        for j in range(y.shape[1]):
            y[c, j] += bc


@njit(parallel=True, **_JIT)
def _row_sums(dy, out):               # out[c] = sum_j dy[c, j], float64 accumulators
    for c in prange(dy.shape[0]):
        acc = 0.0
        for j in range(dy.shape[1]):
            acc += dy[c, j]
        out[c] = acc


def _is_1x1(w, stride, padding):
    return w.shape[2] == 1 and w.shape[3] == 1 and stride == 1 and padding == 0


def conv2d_forward_v6(x, w, b, stride=1, padding=0):
    stride, padding = _check_conv("conv2d", x, w, b, stride, padding, cin_axis=1)
    if not _is_1x1(w, stride, padding):
        y, cache = conv2d_forward_v5(x, w, b, stride, padding)
        return y, ("v5", cache)
    x = native(x)
    B, Cin, H, W = x.shape
    Cout = w.shape[0]
    dt = x.dtype
    X = cm(x).reshape(Cin, B * H * W)                 # a view when x is a channel-major view
    W2 = np.ascontiguousarray(np.asarray(w, dtype=dt).reshape(Cout, Cin))
    Y = matmul(W2, X)                                 # (Cout, B H W)
    if b is not None:
        _add_row_bias(Y, np.ascontiguousarray(b, dtype=dt))
    return nchw(Y.reshape(Cout, B, H, W)), ("gemm", (X, W2, x.shape, b is not None))


def conv2d_backward_v6(dy, cache):
    kind, cache = cache
    if kind == "v5":
        return conv2d_backward_v5(dy, cache)
    X, W2, (B, Cin, H, W), has_b = cache
    Cout = W2.shape[0]
    dY = cm(dy, X.dtype).reshape(Cout, B * H * W)
    dw = matmul_nt(dY, X).reshape(Cout, Cin, 1, 1)
    dX = matmul_t(W2, True, dY, False)                # (Cin, B H W)
    db = None
    if has_b:
        db64 = np.empty(Cout, np.float64)
        _row_sums(dY, db64)
        db = db64.astype(X.dtype)
    return nchw(dX.reshape(Cin, B, H, W)), dw, db
