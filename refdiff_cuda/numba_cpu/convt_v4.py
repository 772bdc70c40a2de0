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
(r, m), so the scatter is a copy (_scatter: a parallel numba pass that also says whether y
holds a NaN, where four NumPy strided assignments and an isnan pass ran on one thread).
Version 3 runs the same sums as a conv of the zero-upsampled
input, s^2 = 4x the multiply-adds (unet-seed's 4 x 4 stride-2 upsamples); here none are wasted
but the A - 1 border of Z.

Backward: dZ is dy gathered back (_gather, 0 at Z's unused border, dy's finiteness taken on
the way), conv2d's backward (version 6) gives
dx, dWc and dbc, and dw, db fold back (the adjoint of Wc's construction; db sums the phases).
Other transposed convs (stride 1, s not dividing k) are version 3's. Non-finite inputs (x, w,
or dy) go to version 1: this frame multiplies other zeros than the reference's (it skips some
the reference multiplies, and multiplies Z's padding), so 0 x inf would put NaN elsewhere; a
result holding NaN is recomputed by version 1 too.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

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


@njit(cache=True)
def _cols(s, p, r, n_out):
    """(n0, q0, count): phase r's first Z column n0 that an output reads, its output q0 = s n0 + r - p
    (u = q + p = s n + r), and how many of outputs q0, q0 + s, ... lie below n_out."""
    n0 = -((p - r) // -s) if p > r else 0
    q0 = s * n0 + r - p
    return n0, q0, (n_out - q0 + s - 1) // s if q0 < n_out else 0


@njit(parallel=True, cache=True)
def _scatter(Zc, s, p, Y):
    """Y[co, b, o, q] = Zc[(o + p) % s, (q + p) % s, co, b, (o + p) // s, (q + p) // s]: every output
    pixel from its phase (u = o + p = s m + r), one (channel, sample) plane per task; per output
    row, each phase's run of Z is read contiguously and written every s-th pixel. Returns
    whether Y holds a NaN (taken in the same pass)."""
    Cout, B, Ho, Wo = Y.shape
    Zh, Zw = Zc.shape[4], Zc.shape[5]
    Zf, Yf = Zc.reshape(-1), Y.reshape(-1)
    nan = np.zeros(Cout * B, np.uint8)
    for task in prange(Cout * B):                   # task = co B + b: Y's plane, and Z's within a phase
        found = 0
        for o in range(Ho):
            ry, my = (o + p) % s, (o + p) // s
            ybase = (task * Ho + o) * Wo
            for rx in range(s):
                n0, q0, count = _cols(s, p, rx, Wo)
                zbase = (((ry * s + rx) * Cout * B + task) * Zh + my) * Zw + n0
                for k in range(count):
                    v = Zf[zbase + k]
                    Yf[ybase + q0 + s * k] = v
                    found |= v != v
        nan[task] = found
    return nan.any()


@njit(parallel=True, cache=True)
def _gather(dyc, s, p, dZ):
    """The adjoint of _scatter: dZ[ry, rx, co, b, m, n] = dy[co, b, s m + ry - p, s n + rx - p], 0 where
    that is outside dy (Z's border, which no output reads). Returns whether dy is finite (taken
    in the same pass). dyc (Cout, B, Ho, Wo) C-contiguous."""
    Cout, B, Ho, Wo = dyc.shape
    Zh, Zw = dZ.shape[4], dZ.shape[5]
    df, Zf = dyc.reshape(-1), dZ.reshape(-1)
    bad = np.zeros(Cout * B, np.uint8)
    for task in prange(Cout * B):
        nf = 0
        for ry in range(s):
            for rx in range(s):
                n0, q0, count = _cols(s, p, rx, Wo)
                for m in range(Zh):
                    zrow = (((ry * s + rx) * Cout * B + task) * Zh + m) * Zw
                    o = s * m + ry - p
                    if o < 0 or o >= Ho:
                        for n in range(Zw):
                            Zf[zrow + n] = 0
                        continue
                    for n in range(n0):
                        Zf[zrow + n] = 0
                    dbase = (task * Ho + o) * Wo + q0
                    for k in range(count):
                        v = df[dbase + s * k]
                        Zf[zrow + n0 + k] = v
                        nf |= (v - v) != 0           # v - v is NaN for inf and NaN, else 0
                    for n in range(n0 + count, Zw):
                        Zf[zrow + n] = 0
        bad[task] = nf
    return not bad.any()


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
    if _scatter(Zc, s, padding, Y):                       # padding zeros x inf: see the module docstring
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
    dyc = np.ascontiguousarray(cm(dy, x.dtype))
    Cout, B, Ho, Wo = dyc.shape
    dZ = np.empty((s, s, Cout, B, zshape[2], zshape[3]), x.dtype)
    if not _gather(dyc, s, p, dZ):
        return _redo(x, w, b, s, p, dy)
    dx, dwc, dbc = conv2d_backward_v6(nchw(dZ.reshape(s * s * Cout, B, zshape[2], zshape[3])), conv_cache)
    dw = _phase_weight_grad(dwc, s, wshape)
    if np.isnan(dw).any() or np.isnan(dx).any():
        return _redo(x, w, b, s, p, dy)
    db = None if dbc is None else dbc.reshape(s * s, Cout).sum(axis=0)
    return dx, dw, db
