"""conv2d version 5 (numba, CPU): version 4 with its wide-row GEMM done by an implicit-GEMM
SIMD micro-kernel (_simd.py) instead of im2col + BLAS. Twin of refdiff/nn/conv.py's conv2d.

In version 4's wide-row frame the column of tap k = (c, i, j) for one sample is a run of the
padded planes starting at off[k] = c ldx + i Wp + j. So the micro-kernel needs no column
matrix at all: it reads x[off[k] + n] directly, for 8 output channels x 32 pixels
(float32) held in registers over the whole sum over k, one fused multiply-add per term.
Measured on one core: ~100 GFLOP/s for 8 channels, where OpenBLAS's sgemm on the same
shapes (M = Cout = 10 or 20) reached 40-60, its small-M edge cases dominating.

Forward: one parallel loop over samples; per sample, blocks of up to 8 output channels
call the kernel into a per-thread wide buffer, then its valid columns (plus bias) go to y.
Backward: dx is the same forward on dy padded by k - 1 - p with w flipped (Cin <-> Cout);
dw[co, k] = sum_n dy_wide[co, n] x[off[k] + n] (dy widened with zeros in the garbage
columns) by a second kernel holding 4 channels x 5 taps of vector partial sums (per-thread
dw partials, added at the end; one call sums a chunk of samples). Tiny images take version 4's
dense path. A stride-s conv is a stride-1 conv of the s^2 polyphase components of its padded
input, with kernels of k/s taps a side (see _to_phases), when s divides k (else the phase
kernels would hold zero taps, extra work that can also turn 0 x inf into NaN): unet-seed's
4 x 4 stride-2 downsamples become 2 x 2 convs over 4 Cin channels, no extra multiply-adds.
Other convs use version 2. A strided conv whose x or w holds inf or NaN is version 1's from
the start (the polyphase and version-2 frames multiply other zeros than the reference's),
and NaN in any fast result (an inf among the inputs, multiplied by a zero the reference never
multiplies) is recomputed by version 1, see conv_v4._v1_redo.
"""
from __future__ import annotations

import functools

import numpy as np
from numba import get_num_threads, get_thread_id, njit, prange

from refdiff.nn.conv import _check_conv, _conv_out

from . import _simd
from ._cache import cached_njit
from ._layout import cm, native, nchw
from .conv import conv2d_backward_v2, conv2d_forward_v2
from .conv_v4 import (_dense_applies, _narrow, _pad_planes, _v1_redo, _wide_applies, _widen, conv2d_backward_v4,
                      conv2d_forward_v4)

MR, NV = 8, 2        # forward: at most MR output channels x NV vectors of pixels per kernel call
DR, DK = 4, 5        # dw: output channels x taps per kernel call (4 x 5: 75 GFLOP/s on one core)
# Pixels per dw kernel call: one sample of a 7 x 7 image is 64 (wide, rounded up), too few to
# pay for the kernel's 20 closing lane reductions (6.4 ms against 3.9 ms for version 4's BLAS
# dw, measured); so a call sums several samples, up to about this many pixels.
_DW_PIXELS = 1024


@functools.lru_cache(maxsize=None)
def _dw_loop(dtype):
    """The parallel dw loop for one dtype (see conv2d_backward_v5)."""
    kdw = _simd.dw_function(DR, DK, np.dtype(dtype))

    @cached_njit(parallel=True)
    def loop(xp, HpWp, Wp, off, dyc, cb, dw_part, dyw_s, ldy):
        Cout, B, Ho, Wo = dyc.shape
        Cp, Kp = dw_part.shape[1], dw_part.shape[2]
        xf = xp.reshape(-1)
        sdy = cb * ldy                       # row length of a thread's widened dy buffer
        for ch in prange((B + cb - 1) // cb):
            tid = get_thread_id()
            b0 = ch * cb
            nb = min(cb, B - b0)
            dyw = dyw_s[tid]                 # rows >= Cout and each sample's columns >= Ho Wp stay 0
            _widen(dyc, b0, nb, Wp, ldy, dyw)
            dyf, dwf, xb = dyw.reshape(-1), dw_part[tid].reshape(-1), xf[b0 * HpWp:]
            for c0 in range(0, Cp, DR):
                for k0 in range(0, Kp, DK):
                    kdw(dyf[c0 * sdy:].ctypes, sdy, xb.ctypes, off[k0:].ctypes, dwf[c0 * Kp + k0:].ctypes, Kp,
                        ldy, nb, ldy, HpWp)
    return loop


@functools.lru_cache(maxsize=None)
def _forward_loop(dtype):
    """The parallel forward loop for one dtype, with the kernels for 1..MR channels bound in."""
    k1, k2, k3, k4, k5, k6, k7, k8 = [_simd.kernel_function(m, NV, np.dtype(dtype)) for m in range(1, MR + 1)]

    @cached_njit(parallel=True)
    def loop(xp, HpWp, Wp, off, w2, Ho, Wo, bias, has_b, Y, yw_s, ldy):
        Cout, K = w2.shape
        B = Y.shape[1]
        nw = Ho * Wp
        xf, wf = xp.reshape(-1), w2.reshape(-1)
        for b in prange(B):
            yw = yw_s[get_thread_id()]
            ywf = yw.reshape(-1)
            xb = xf[b * HpWp:]
            nblk = (Cout + MR - 1) // MR             # balanced blocks: 10 = 5 + 5, not 8 + 2
            for blk in range(nblk):
                c0 = blk * (Cout // nblk) + min(blk, Cout % nblk)
                m = Cout // nblk + (1 if blk < Cout % nblk else 0)
                wp, yp = wf[c0 * K:], ywf[c0 * ldy:]
                if m == 8:
                    k8(xb.ctypes, off.ctypes, K, wp.ctypes, K, yp.ctypes, ldy, nw)
                elif m == 7:
                    k7(xb.ctypes, off.ctypes, K, wp.ctypes, K, yp.ctypes, ldy, nw)
                elif m == 6:
                    k6(xb.ctypes, off.ctypes, K, wp.ctypes, K, yp.ctypes, ldy, nw)
                elif m == 5:
                    k5(xb.ctypes, off.ctypes, K, wp.ctypes, K, yp.ctypes, ldy, nw)
                elif m == 4:
                    k4(xb.ctypes, off.ctypes, K, wp.ctypes, K, yp.ctypes, ldy, nw)
                elif m == 3:
                    k3(xb.ctypes, off.ctypes, K, wp.ctypes, K, yp.ctypes, ldy, nw)
                elif m == 2:
                    k2(xb.ctypes, off.ctypes, K, wp.ctypes, K, yp.ctypes, ldy, nw)
                else:
                    k1(xb.ctypes, off.ctypes, K, wp.ctypes, K, yp.ctypes, ldy, nw)
            _narrow(yw, b, 1, Wp, ldy, bias, has_b, Y)    # keep the Wo valid columns of each wide row
    return loop


@functools.lru_cache(maxsize=256)
def _taps(C, kH, kW, ldx, Wp, pad_to=1):
    """off[k] = c ldx + i Wp + j for tap k = (c, i, j), then copies of off[0] up to a multiple of
    pad_to. Cached (and never written): building it cost 0.15 ms a call, 10 ms a training step."""
    c, i, j = np.meshgrid(np.arange(C), np.arange(kH), np.arange(kW), indexing="ij")
    off = (c * ldx + i * Wp + j).reshape(-1).astype(np.int64)
    return np.concatenate([off, np.full(-len(off) % pad_to, off[0], np.int64)])


def _simd_conv(xc, w, b, ph, pw):
    """Stride-1 conv of channel-major xc (C, B, H, W) with w (Cout, C, kH, kW), paddings ph, pw;
    returns y (Cout, B, Ho, Wo) and the padded planes (kept for dw)."""
    C, B, H, W = xc.shape
    Cout, _, kH, kW = w.shape
    Hp, Wp = H + 2 * ph, W + 2 * pw
    Ho, Wo = Hp - kH + 1, Wp - kW + 1
    assert Ho >= 1 and Wo >= 1 and C * kH * kW >= 1, "the kernels' loops run at least once"
    dt = xc.dtype
    L = _simd.LANES[np.dtype(dt)] * NV
    xp = _pad_planes(xc, ph, pw, kW - 1 + L)            # slack: the kernel reads whole vectors
    off = _taps(C, kH, kW, xp.shape[1], Wp)
    w2 = np.ascontiguousarray(w.reshape(Cout, -1))
    nw = Ho * Wp
    ldy = -(-nw // L) * L
    Y = np.empty((Cout, B, Ho, Wo), dt)
    bias = np.zeros(Cout, dt) if b is None else np.ascontiguousarray(b, dtype=dt)
    _forward_loop(dt)(xp, Hp * Wp, Wp, off, w2, Ho, Wo, bias, b is not None, Y,
                      np.empty((get_num_threads(), Cout, ldy), dt), ldy)
    return Y, xp


# ---- strided convs: polyphase decomposition ----------------------------------------------------
# y[ro, qo] = sum_{c,i,j} w[c, i, j] xpad[c, ro s + i, qo s + j]. With i = a s + py, j = b s + px,
# xpad[ro s + i] = xpad[(ro + a) s + py]: so y is a stride-1, unpadded conv of the s^2 phases
# xq[(c, py, px), R, Q] = xpad[c, R s + py, Q s + px] with the kernel
# wq[(c, py, px), a, b] = w[c, a s + py, b s + px] (0 past the kernel), ceil(k/s) taps a side.
@njit(parallel=True, cache=True)
def _phase_map(x, xq, s, p, to_phases):
    """x (C, B, H, W) <-> xq (C s s, B, Hq, Wq), xq[(c, py, px), b, R, Q] = x[c, b, R s + py - p, Q s + px - p]:
    to_phases copies x into xq, else xq into x (its adjoint: each pixel has one phase entry, and
    pixels past Hq, Wq, which no output reads, are left as they are: 0). Loops over the phases'
    rows: an integer division per pixel made it 5 ms."""
    C, B, H, W = x.shape
    Hq, Wq = xq.shape[2], xq.shape[3]
    for task in prange(C * B):
        c, b = task // B, task % B
        for py in range(s):
            for px in range(s):
                k = (c * s + py) * s + px
                Q0 = max(0, (p - px + s - 1) // s)                 # q = Q s + px - p in [0, W)
                Q1 = min(Wq, (W - 1 + p - px) // s + 1) if W - 1 + p - px >= 0 else 0
                for R in range(Hq):
                    r = R * s + py - p
                    if r < 0 or r >= H:
                        continue
                    for Q in range(Q0, Q1):
                        q = Q * s + px - p
                        if to_phases:
                            xq[k, b, R, Q] = x[c, b, r, q]
                        else:
                            x[c, b, r, q] = xq[k, b, R, Q]


def _to_phases(x, s, p, Hq, Wq):
    C, B = x.shape[:2]
    xq = np.zeros((C * s * s, B, Hq, Wq), x.dtype)
    _phase_map(x, xq, s, p, True)
    return xq


def _from_phases(dxq, s, p, H, W):
    Cs, B = dxq.shape[:2]
    dx = np.zeros((Cs // (s * s), B, H, W), dxq.dtype)
    _phase_map(dx, dxq, s, p, False)
    return dx


def _phase_weight(w, s):
    """w (Cout, Cin, kH, kW) -> wq (Cout, Cin s s, ceil(kH/s), ceil(kW/s))."""
    Cout, Cin, kH, kW = w.shape
    wq = np.zeros((Cout, Cin, s, s, -(-kH // s), -(-kW // s)), w.dtype)
    for py in range(s):
        for px in range(s):
            sub = w[:, :, py::s, px::s]
            wq[:, :, py, px, :sub.shape[2], :sub.shape[3]] = sub
    return wq.reshape(Cout, Cin * s * s, wq.shape[4], wq.shape[5])


def _phase_weight_grad(dwq, s, wshape):
    """Adjoint of _phase_weight: dw (Cout, Cin, kH, kW) from dwq."""
    Cout, Cin, kH, kW = wshape
    d6 = dwq.reshape(Cout, Cin, s, s, dwq.shape[2], dwq.shape[3])
    dw = np.empty(wshape, dwq.dtype)
    for py in range(s):
        for px in range(s):
            n_i, n_j = len(range(py, kH, s)), len(range(px, kW, s))
            dw[:, :, py::s, px::s] = d6[:, :, py, px, :n_i, :n_j]
    return dw


def dw_by_taps(xp, HpWp, Wp, off, dyc, wshape):
    """dw (wshape) of a conv over the padded planes xp (C, B HpWp + slack), tap k of w's flattened
    (c, i, j) order read at off[k] (off padded to a multiple of DK; the padding's columns are
    dropped): dw[co, k] = sum over samples and wide pixels n of dy_wide[co, n] xp[off[k] + n],
    by the dw loop (_dw_loop), dyc (Cout, B, Ho, Wo) widened to rows of Wp."""
    Cout, B, Ho, _ = dyc.shape
    dt, T = xp.dtype, get_num_threads()
    L = _simd.LANES[np.dtype(dt)]
    ldy = -(-(Ho * Wp) // L) * L
    cb = max(1, min(-(-B // T), _DW_PIXELS // ldy))   # samples per kernel call
    Cp = -(-Cout // DR) * DR
    dw_part = np.zeros((T, Cp, len(off)), dt)        # padded rows / taps: computed, then dropped
    _dw_loop(dt)(xp, HpWp, Wp, off, dyc, cb, dw_part, np.zeros((T, Cp, cb * ldy), dt), ldy)
    K = int(np.prod(wshape[1:]))
    return np.ascontiguousarray(dw_part.sum(axis=0)[:Cout, :K]).reshape(wshape)


def conv2d_forward_v5(x, w, b, stride=1, padding=0):
    stride, padding = _check_conv("conv2d", x, w, b, stride, padding, cin_axis=1)
    x = native(x)
    B, Cin, H, W = x.shape
    Cout, _, kH, kW = w.shape
    Ho, Wo = _conv_out("conv2d", H, kH, stride, padding), _conv_out("conv2d", W, kW, stride, padding)
    if _dense_applies(H, W, kH, kW):
        y, cache = conv2d_forward_v4(x, w, b, stride, padding)
        return y, ("v4", cache)
    dt = x.dtype
    w = np.asarray(w, dtype=dt)
    if stride > 1 and not (np.isfinite(x).all() and np.isfinite(w).all()):   # strided paths sum other zeros
        return _v1_redo(x, w, b, stride, padding)        # than the reference (see conv_v4._v1_redo)
    if stride > 1 and kH % stride == 0 and kW % stride == 0:   # polyphase: a stride-1 conv (see the docstring)
        kq, lq = kH // stride, kW // stride
        xq = _to_phases(cm(x), stride, padding, Ho + kq - 1, Wo + lq - 1)
        wq = _phase_weight(w, stride)
        Y, xp = _simd_conv(xq, wq, b, 0, 0)
        inner = (xp, wq, (B,) + xq.shape[:1] + xq.shape[2:], 0, b)     # conv2d v5's own cache
        return nchw(Y), ("poly", (inner, stride, padding, x, w, b))
    if stride > 1 or not _wide_applies(1, padding, kH, kW):
        y, cache = conv2d_forward_v2(x, w, b, stride, padding)
        return y, ("v2", (cache, (x, w, b, stride, padding)))
    Y, xp = _simd_conv(cm(x), w, b, padding, padding)
    return nchw(Y), ("simd", (xp, w, (B, Cin, H, W), padding, b))


def conv2d_backward_v5(dy, cache):
    kind, cache = cache
    if kind in ("v4", "v1"):
        return conv2d_backward_v4(dy, (kind, cache) if kind == "v1" else cache)
    if kind == "v2":
        cache, args = cache
        if not np.isfinite(dy).all():
            return _v1_redo(*args, dy)
        return conv2d_backward_v2(dy, cache)
    if kind == "poly":
        inner, s, p, x, w, b = cache
        if not np.isfinite(dy).all():
            return _v1_redo(x, w, b, s, p, dy)
        dxq, dwq, db = conv2d_backward_v5(dy, ("simd", inner))
        dx, dw = nchw(_from_phases(cm(dxq), s, p, *x.shape[2:])), _phase_weight_grad(dwq, s, w.shape)
        if np.isnan(dw).any() or np.isnan(dx).any():       # see conv_v4._v1_redo
            return _v1_redo(x, w, b, s, p, dy)
        return dx, dw, db
    xp, w, (B, Cin, H, W), padding, b = cache
    has_b = b is not None
    kH, kW = w.shape[2:]
    dyc = cm(dy, xp.dtype)                                               # (Cout, B, Ho, Wo)
    Hp, Wp = H + 2 * padding, W + 2 * padding
    dw = dw_by_taps(xp, Hp * Wp, Wp, _taps(Cin, kH, kW, xp.shape[1], Wp, DK), dyc, w.shape)
    if np.isnan(dw).any():               # garbage columns x 0 (see conv_v4._v1_redo); x from the padded planes
        x = nchw(xp[:, :B * Hp * Wp].reshape(Cin, B, Hp, Wp)[:, :, padding:padding + H, padding:padding + W])
        return _v1_redo(x, w, b, 1, padding, dy)
    w_adj = np.ascontiguousarray(w.transpose(1, 0, 2, 3)[:, :, ::-1, ::-1])   # (Cin, Cout, kH, kW)
    dX, _ = _simd_conv(dyc, w_adj, None, kH - 1 - padding, kW - 1 - padding)
    db = dyc.sum(axis=(1, 2, 3)) if has_b else None
    return nchw(dX), dw, db
