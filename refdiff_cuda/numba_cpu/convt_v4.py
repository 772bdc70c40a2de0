"""conv_transpose2d version 4 (numba, CPU): a strided transposed conv as ONE stride-1 conv2d of
its input with s^2 Cout output channels (polyphase), then a scatter. Twin of
refdiff/nn/conv.py's conv_transpose2d.

For kernel k = s A (s divides k, each dimension), output o, u = o + p = s m + r (0 <= r < s):

    y[co, o] = b[co] + sum_{ci, a < A} x[ci, m - a] w[ci, co, s a + r]          (x = 0 outside)
             = b[co] + sum_{ci, a' < A} xpad[ci, m + a'] w[ci, co, s (A - 1 - a') + r]

with xpad = x padded by A - 1: phase r of the output is a stride-1 conv of x with a kernel of
A taps, and all s^2 phases (2-D: r = (ry, rx)) are one conv2d with weights
Wc[(ry, rx, co), ci, a', b'] = w[ci, co, s (A-1-a') + ry, s (A-1-b') + rx], bias b tiled,
output (H + A - 1) x (W + A - 1). Output o = s m + r - p takes Z[r, m]; every o has exactly one
(r, m), so the scatter is a copy. Version 3 runs the same sums as a conv of the zero-upsampled
input, s^2 = 4x the multiply-adds (unet-seed's 4 x 4 stride-2 upsamples); here none are wasted
but the A - 1 border of Z.

Backward: dZ is dy gathered back (0 at Z's unused border), conv2d's backward (version 6) gives
dx, dWc and dbc, and dw, db fold back (the adjoint of Wc's construction; db sums the phases).
Other transposed convs (stride 1, s not dividing k) are version 3's. Non-finite inputs (x, w,
or dy) go to version 1: this frame multiplies other zeros than the reference's (it skips some
the reference multiplies, and multiplies Z's padding), so 0 x inf would put NaN elsewhere; a
result holding NaN is recomputed by version 1 too.
"""
from __future__ import annotations

import numpy as np

from refdiff.nn.conv import _check_conv, _convt_out

from ._layout import cm, native, nchw
from .conv_v6 import conv2d_backward_v6, conv2d_forward_v6
from .convt_v3 import _redo, conv_transpose2d_backward_v3, conv_transpose2d_forward_v3


def _applies(w, stride):
    return stride > 1 and w.shape[2] % stride == 0 and w.shape[3] % stride == 0


def _phase_weight(w, s):
    """w (Cin, Cout, kH, kW) -> Wc (s s Cout, Cin, kH/s, kW/s) (see the module docstring)."""
    Cin, Cout, kH, kW = w.shape
    w6 = w.reshape(Cin, Cout, kH // s, s, kW // s, s)[:, :, ::-1, :, ::-1, :]      # [ci, co, a', ry, b', rx]
    return np.ascontiguousarray(w6.transpose(3, 5, 1, 0, 2, 4)).reshape(s * s * Cout, Cin, kH // s, kW // s)


def _phase_weight_grad(dwc, s, shape):
    """The adjoint of _phase_weight: dw (Cin, Cout, kH, kW) from dWc."""
    Cin, Cout, kH, kW = shape
    d6 = dwc.reshape(s, s, Cout, Cin, kH // s, kW // s).transpose(3, 2, 4, 0, 5, 1)   # [ci, co, a', ry, b', rx]
    return np.ascontiguousarray(d6[:, :, ::-1, :, ::-1, :]).reshape(shape)


def _phases(s, p, n_out):
    """[(r, m0, o0, count)]: phase r fills outputs o0, o0 + s, ... (count of them) from Z rows m0, m0 + 1, ..."""
    out = []
    for r in range(s):
        m0 = max(0, (p - r + s - 1) // s)
        o0 = s * m0 + r - p
        out.append((r, m0, o0, len(range(o0, n_out, s))))
    return out


def conv_transpose2d_forward_v4(x, w, b, stride=1, padding=0):
    stride, padding = _check_conv("conv_transpose2d", x, w, b, stride, padding, cin_axis=0)
    if not _applies(w, stride):
        y, cache = conv_transpose2d_forward_v3(x, w, b, stride, padding)
        return y, ("v3", cache)
    x = native(x)
    if not (np.isfinite(x).all() and np.isfinite(w).all()):   # the reference's own frame multiplies zeros
        return _redo(x, w, b, stride, padding)                 # this one does not: NaN would land elsewhere
    dt, s = x.dtype, stride
    B, _, H, W = x.shape
    Cout, kH, kW = w.shape[1:]
    Ho, Wo = _convt_out(H, kH, s, padding), _convt_out(W, kW, s, padding)
    wc = _phase_weight(np.asarray(w, dtype=dt), s)
    bc = None if b is None else np.tile(np.asarray(b, dtype=dt), s * s)
    A = kH // s
    if A - 1 != kW // s - 1:                              # conv2d takes one padding for both sides
        y, cache = conv_transpose2d_forward_v3(x, w, b, stride, padding)
        return y, ("v3", cache)
    Z, conv_cache = conv2d_forward_v6(x, wc, bc, 1, A - 1)
    Zc = cm(Z).reshape(s, s, Cout, B, Z.shape[2], Z.shape[3])
    Y = np.empty((Cout, B, Ho, Wo), dt)
    for ry, my, oy, ny in _phases(s, padding, Ho):
        for rx, mx, ox, nx in _phases(s, padding, Wo):
            Y[:, :, oy::s, ox::s] = Zc[ry, rx, :, :, my:my + ny, mx:mx + nx]
    if np.isnan(Y).any():                                 # padding zeros x inf: see the module docstring
        return _redo(x, w, b, s, padding)
    return nchw(Y), ("poly", (conv_cache, Z.shape, w.shape, s, padding, (x, w, b)))


def conv_transpose2d_backward_v4(dy, cache):
    kind, cache = cache
    if kind == "v1":
        from .conv import conv_transpose2d_backward_v1
        return conv_transpose2d_backward_v1(dy, cache)
    if kind == "v3":
        return conv_transpose2d_backward_v3(dy, cache)
    conv_cache, zshape, wshape, s, p, (x, w, b) = cache
    if not np.isfinite(dy).all():
        return _redo(x, w, b, s, p, dy)
    dyc = cm(dy, x.dtype)
    Cout, B, Ho, Wo = dyc.shape
    dZ = np.zeros((s, s, Cout, B, zshape[2], zshape[3]), x.dtype)
    for ry, my, oy, ny in _phases(s, p, Ho):
        for rx, mx, ox, nx in _phases(s, p, Wo):
            dZ[ry, rx, :, :, my:my + ny, mx:mx + nx] = dyc[:, :, oy::s, ox::s]
    dx, dwc, dbc = conv2d_backward_v6(nchw(dZ.reshape(s * s * Cout, B, zshape[2], zshape[3])), conv_cache)
    dw = _phase_weight_grad(dwc, s, wshape)
    if np.isnan(dw).any() or np.isnan(dx).any():
        return _redo(x, w, b, s, p, dy)
    db = None if dbc is None else dbc.reshape(s * s, Cout).sum(axis=0)
    return dx, dw, db
