"""conv2d version 7 (numba, CPU): version 6, with strided convolutions through the polyphase
frame built in one pass and read tap by tap. Twin of refdiff/nn/conv.py's conv2d.

A stride-s conv reads, for output (ro, qo) and tap (i, j), xpad[ro s + i, qo s + j]. With
i = a s + py, j = b s + px that is phase plane (py, px) of the padded input,

    xq[(c, py, px), R, Q] = xpad[c, R s + py, Q s + px],    at (R, Q) = (ro + a, qo + b),

so the conv is a stride-1 sum over the s^2 phase planes, every tap (c, i, j) one offset into
them: off[(c, i, j)] = plane(c, i % s, j % s) + (i // s) Wq + (j // s). The SIMD
micro-kernel (_simd.py, version 5's forward loop) reads exactly the kernel's taps through
these offsets, whatever s and k, and the planes are written in one pass (_phase_planes:
every entry, zeros where the padding or the image's edge is, and x's finiteness on the way).
Version 5's own polyphase path ("poly") writes the planes in two passes (the phases, then
their padded copy) and reads them through the kernel padded to a multiple of s a side, so
it takes only kernels that s divides; a 3 x 3 kernel at stride 2 (unet-ddpm's downsamples)
would hold 16 taps for 9, and version 5 runs it as version 2 does, im2col and BLAS.

Backward: when s divides k (unet-seed's 4 x 4 downsamples), the planes are version 5's own
and so is the backward ("poly": one stride-1 conv for dx over all phases, no zero taps).
Otherwise dw comes tap by tap too, by version 5's dw loop over the planes with these offsets
(conv_v5.dw_by_taps), and dx as version 2 takes it, col2im(w^T dy): one BLAS product, then the scatter-add
(a correlation of dy per phase, with that phase's taps, measured slower on unet-ddpm's 7 x 7
output, whose rows are short). On unet-ddpm's 3 x 3 stride-2 layers the forward is faster
than version 6's, the backward is not; on unet-seed's 4 x 4 ones both are within the
machine's noise of version 6's: `python benchmarks/conv_layers.py --model unet-ddpm --batch
64 --versions 6,7`, quoted in docs/performance.md.
The sums run over the taps in (c, i, j) order, as the reference's im2col rows, but in another
grouping (fused multiply-adds, lanes); within refdiff_cuda.testing.TOL as every version.

Non-finite x or w go to version 1 before any of this (version 5's rule for strided convs, see
conv_v4._v1_redo), and so does a non-finite dy. Everything else (stride 1, tiny images,
1 x 1 convs) is version 6's.
"""
from __future__ import annotations

import functools

import numpy as np
from numba import get_num_threads, njit, prange

from refdiff.nn.conv import _check_conv, _conv_out

from . import _simd
from ._layout import cm, native, nchw
from .conv import dx_col2im
from .conv_v4 import _dense_applies, _v1_redo
from .conv_v5 import DK, NV, _forward_loop, _phase_weight, conv2d_backward_v5, dw_by_taps
from .conv_v6 import conv2d_backward_v6, conv2d_forward_v6


@njit(parallel=True, cache=True)
def _phase_planes(x, s, p, Hq, Wq, slack):
    """x (C, B, H, W) -> (xq (C s s, B Hq Wq + slack), finite): xq[(c, py, px), b Hq Wq + R Wq + Q] =
    x[c, b, R s + py - p, Q s + px - p], 0 outside x and in the slack; conv_v5's
    _pad_planes(_to_phases(x, s, p, Hq, Wq), 0, 0, slack), in one pass. finite: whether every
    entry of x is finite (taken in the same pass: a NumPy isfinite over x cost a serial pass)."""
    C, B, H, W = x.shape
    n = Hq * Wq
    xq = np.empty((C * s * s, B * n + slack), x.dtype)
    bad = np.zeros(C * B, np.uint8)
    for task in prange(C * B):
        c, b = task // B, task % B
        for py in range(s):
            for px in range(s):
                row = xq[(c * s + py) * s + px]
                base = b * n
                for R in range(Hq):
                    r = R * s + py - p
                    o = base + R * Wq
                    if r < 0 or r >= H:
                        for Q in range(Wq):
                            row[o + Q] = 0
                        continue
                    for Q in range(Wq):
                        q = Q * s + px - p
                        row[o + Q] = x[c, b, r, q] if 0 <= q < W else 0
                if b == B - 1:
                    for k in range(B * n, B * n + slack):
                        row[k] = 0
        nf = 0                                      # v - v is NaN for inf and NaN, else 0
        for r in range(H):
            for q in range(W):
                v = x[c, b, r, q]
                nf |= (v - v) != 0
        bad[task] = nf
    return xq, not bad.any()


@functools.lru_cache(maxsize=256)
def _phase_taps(C, kH, kW, s, ldx, Wq, pad_to=1):
    """off[(c, i, j)] = ((c s + i % s) s + j % s) ldx + (i // s) Wq + j // s, in w's (c, i, j) order,
    then copies of off[0] up to a multiple of pad_to (cached and never written, as conv_v5._taps)."""
    c, i, j = np.meshgrid(np.arange(C), np.arange(kH), np.arange(kW), indexing="ij")
    off = (((c * s + i % s) * s + j % s) * ldx + (i // s) * Wq + j // s).reshape(-1).astype(np.int64)
    return np.concatenate([off, np.full(-len(off) % pad_to, off[0], np.int64)])


def _applies(x, w, stride):
    """Strided, larger than the kernel, and a dtype the SIMD kernels have (others: version 6's)."""
    return (stride > 1 and np.dtype(x.dtype) in _simd.LANES
            and not _dense_applies(x.shape[2], x.shape[3], w.shape[2], w.shape[3]))


def conv2d_forward_v7(x, w, b, stride=1, padding=0):
    stride, padding = _check_conv("conv2d", x, w, b, stride, padding, cin_axis=1)
    x = native(x)
    if not _applies(x, w, stride):
        y, cache = conv2d_forward_v6(x, w, b, stride, padding)
        return y, ("v6", cache)
    B, Cin, H, W = x.shape
    Cout, _, kH, kW = w.shape
    Ho, Wo = _conv_out("conv2d", H, kH, stride, padding), _conv_out("conv2d", W, kW, stride, padding)
    dt = x.dtype
    w = np.asarray(w, dtype=dt)
    s = stride
    kq, lq = -(-kH // s), -(-kW // s)
    Hq, Wq = Ho + kq - 1, Wo + lq - 1
    L = _simd.LANES[np.dtype(dt)] * NV
    xq, finite = _phase_planes(cm(x), s, padding, Hq, Wq, lq - 1 + L)   # slack: the kernel reads whole vectors
    if not (finite and np.isfinite(w).all()):                # see the module docstring
        return _v1_redo(x, w, b, stride, padding)
    off = _phase_taps(Cin, kH, kW, s, xq.shape[1], Wq)
    w2 = np.ascontiguousarray(w.reshape(Cout, -1))
    ldy = -(-(Ho * Wq) // L) * L
    Y = np.empty((Cout, B, Ho, Wo), dt)
    bias = np.zeros(Cout, dt) if b is None else np.ascontiguousarray(b, dtype=dt)
    _forward_loop(dt)(xq, Hq * Wq, Wq, off, w2, Ho, Wo, bias, b is not None, Y,
                      np.empty((get_num_threads(), Cout, ldy), dt), ldy)
    if kH % s == 0 and kW % s == 0:                          # no zero taps: version 5's backward
        inner = (xq, _phase_weight(w, s), (B, Cin * s * s, Hq, Wq), 0, b)
        return nchw(Y), ("poly", (inner, s, padding, x, w, b))
    return nchw(Y), ("phases", (xq, Hq, Wq, x, w, b, s, padding))


def conv2d_backward_v7(dy, cache):
    kind, cache = cache
    if kind == "v6":
        return conv2d_backward_v6(dy, cache)
    if kind in ("v1", "poly"):
        return conv2d_backward_v5(dy, (kind, cache))
    xq, Hq, Wq, x, w, b, s, p = cache                            # "phases"
    if not np.isfinite(dy).all():
        return _v1_redo(x, w, b, s, p, dy)
    dyc = cm(dy, w.dtype)
    _, Cin, kH, kW = w.shape
    dw = dw_by_taps(xq, Hq * Wq, Wq, _phase_taps(Cin, kH, kW, s, xq.shape[1], Wq, DK), dyc, w.shape)
    dx = dx_col2im(dyc, w, x.shape, s, p)
    if np.isnan(dw).any() or np.isnan(dx).any():                 # see conv_v4._v1_redo
        return _v1_redo(x, w, b, s, p, dy)
    return dx, dw, dyc.sum(axis=(1, 2, 3)) if b is not None else None
