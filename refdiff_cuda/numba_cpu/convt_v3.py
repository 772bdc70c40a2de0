"""conv_transpose2d version 3 (numba, CPU): a transposed conv as a stride-1 conv2d (version 5)
of the zero-upsampled input. Twin of refdiff/nn/conv.py's conv_transpose2d.

    conv_transpose2d(x, w, stride s, padding p) = conv2d(up_s(x), w', stride 1, padding k - 1 - p)

where up_s puts s - 1 zeros between neighbouring pixels ((H - 1) s + 1 rows) and
w'[co, ci, i, j] = w[ci, co, k-1-i, k-1-j] (channels swapped, taps flipped). Output size:
(H - 1) s + 1 + 2 (k - 1 - p) - k + 1 = (H - 1) s - 2 p + k, the transposed conv's. The
backward is conv2d's: dx is its input gradient at the non-inserted pixels, dw its weight
gradient flipped back, db the same.

Why: version 2 spends most of its time scattering columns (col2im 4.6 ms of 8.3 for
unet-seed's 14 -> 28 upsample at batch 128) and gathering them in the backward. The
zeros cost s^2 = 4x the multiply-adds, but conv2d v5's SIMD kernel runs them at ~100
GFLOP/s per core, and its dense path takes the 1 -> 2 upsample. Applies to square kernels
with p <= k - 1 (so k - 1 - p >= 0) where it was measured faster (_applies); other shapes
use version 2.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from refdiff.nn.conv import _check_conv, _convt_out

from ._layout import cm, native, nchw
from .conv import (conv_transpose2d_backward_v1, conv_transpose2d_backward_v2, conv_transpose2d_forward_v1,
                   conv_transpose2d_forward_v2)
from .conv_v4 import redo_with
from .conv_v5 import conv2d_backward_v5, conv2d_forward_v5


@njit(parallel=True, cache=True)
def _upsample(x, s):
    """x (C, B, H, W) -> (C, B, (H-1) s + 1, (W-1) s + 1) with x at the multiples of s, 0 elsewhere."""
    C, B, H, W = x.shape
    up = np.zeros((C, B, (H - 1) * s + 1, (W - 1) * s + 1), x.dtype)
    for task in prange(C * B):
        c, b = task // B, task % B
        for r in range(H):
            for q in range(W):
                up[c, b, r * s, q * s] = x[c, b, r, q]
    return up


def _applies(kH, kW, padding, stride, H, W, Ho, Wo):
    """Square kernel, p <= k - 1, and (measured at batch 128, fwd + bwd) worth the zeros: outputs of
    at least 14 x 14 (14 -> 28: 16.9 -> 8.8 ms; 7 -> 14: 10.6 -> 7.7 ms) or an upsampled image
    small enough for conv2d's dense path (1 -> 2: 4.3 -> 0.7 ms); not 3 -> 6 (4.7 -> 7.2 ms)."""
    if kH != kW or padding > kH - 1:
        return False
    Hu, Wu = (H - 1) * stride + 1, (W - 1) * stride + 1
    return stride == 1 or Ho * Wo >= 196 or Hu * Wu <= kH * kW


def conv_transpose2d_forward_v3(x, w, b, stride=1, padding=0):
    stride, padding = _check_conv("conv_transpose2d", x, w, b, stride, padding, cin_axis=0)
    x = native(x)
    _, _, kH, kW = w.shape
    H, W = x.shape[2:]
    Ho, Wo = _convt_out(H, kH, stride, padding), _convt_out(W, kW, stride, padding)
    if not _applies(kH, kW, padding, stride, H, W, Ho, Wo):
        y, cache = conv_transpose2d_forward_v2(x, w, b, stride, padding)
        return y, ("v2", cache)
    dt = x.dtype
    w_conv = np.ascontiguousarray(np.asarray(w, dtype=dt).transpose(1, 0, 2, 3)[:, :, ::-1, ::-1])
    up = nchw(_upsample(cm(x), stride)) if stride > 1 else x
    y, cache = conv2d_forward_v5(up, w_conv, b, 1, kH - 1 - padding)
    if np.isnan(y).any():                     # inserted zeros x inf: see _redo
        return _redo(x, w, b, stride, padding)
    return y, ("up", (cache, stride, (x, w, b, padding)))


def conv_transpose2d_backward_v3(dy, cache):
    kind, cache = cache
    if kind == "v2":
        return conv_transpose2d_backward_v2(dy, cache)
    if kind == "v1":
        return conv_transpose2d_backward_v1(dy, cache)
    conv_cache, s, (x, w, b, padding) = cache
    dup, dw_conv, db = conv2d_backward_v5(dy, conv_cache)
    dx = dup[:, :, ::s, ::s] if s > 1 else dup
    dw = np.ascontiguousarray(dw_conv[:, :, ::-1, ::-1].transpose(1, 0, 2, 3))
    if np.isnan(dw).any() or np.isnan(dx).any():
        return _redo(x, w, b, s, padding, dy)
    return dx, dw, db


def _redo(x, w, b, stride, padding, dy=None):
    """Version 1's result (the literal port) for the same inputs, when the fast one holds a NaN:
    the inserted zeros multiply the weights and dy, and 0 x inf is NaN where the reference has a
    number (see conv_v4._v1_redo). Finite inputs never come here."""
    return redo_with((conv_transpose2d_forward_v1, conv_transpose2d_backward_v1), x, w, b, stride, padding, dy)
