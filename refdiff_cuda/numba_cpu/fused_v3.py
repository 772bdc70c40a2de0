"""The fused pairs conv2d_silu and group_norm_conv2d, version 3 (numba, CPU): version 2's
arithmetic (fused.py), done one sample at a time. Twins of refdiff.nn.fused.

Version 2 makes three passes over the whole batch: GroupNorm's statistics, then the
normalised, padded planes of every sample (a new buffer as large as the input, plus its
padding), then the convolution. At unet-seed's 28 x 28 layers, batch 64, each of those
arrays is ~2 MB, the size of a core's L2 cache, so every pass reads or writes main memory,
and the convolution of a 10-channel layer took 1.7x its micro-kernel's own time (measured:
1.41 ms for the layer, 0.83 ms in the kernel, one core).

Version 3 runs the whole op inside one parallel loop over samples. For sample b, on its
thread:

    statistics   GroupNorm's mean and rstd of each group of sample b (fused.group_stats:
                 the very code version 2 runs, so the same values);
    input pass   ((x + shift - mu) rstd) gamma + beta [-> SiLU], or x itself for
                 conv2d_silu, into the thread's own padded planes (C x (Hp Wp + slack) floats:
                 36 KB for 10 channels at 28 x 28; the padding is zeroed once per call and
                 never written after);
    GEMM         the SIMD micro-kernel on those planes, in blocks of up to 12 output channels
                 (fused.MR, as version 2);
    epilogue     bias and SiLU on the wide output rows, then their valid columns into y.

Everything between reading x and writing y stays in the core's caches. The arithmetic is
version 2's, term for term (the same kernels, the same order), except that SiLU on the
input runs on whole vectors of each plane where version 2 ran its last n % 16 entries
through silu_v3's scalar formula. Convolutions the frame does not take (strides, images no
larger than the kernel, 1x1 convs, float64) run version 2's composition of the newest ops;
the backward is version 2's (it reruns that composition with its caches).
"""
from __future__ import annotations

import functools

import numpy as np
from numba import get_num_threads, get_thread_id, njit, prange

from refdiff.nn import fused as ref_fused
from refdiff.nn.conv import _check_conv
from refdiff.nn.norm import _check as _check_norm

from . import _simd, conv_v5
from ._cache import cached_njit
from ._layout import cm, native, nchw
from .conv_v4 import _narrow
from .fused import (MR, NEWEST, NV, _fast_applies, _slack, conv2d_silu_backward_v2, group_norm_conv2d_backward_v2,
                    group_stats)

F32 = np.float32


@njit(cache=True)
def _fill_norm(x, b, shift, has_shift, mean, rstd, gamma, beta, G, ph, pw, xp):
    """xp[c, (r + ph) Wp + q + pw] = ((x[c, b, r, q] + shift[b, c] - mu) rstd) gamma[c] + beta[c]."""
    C, _, H, W = x.shape
    Cg = C // G
    Wp = W + 2 * pw
    for c in range(C):
        g = c // Cg
        mu, r, ga, be, sh = mean[b, g], rstd[b, g], gamma[c], beta[c], shift[b, c]
        for i in range(H):
            o = (i + ph) * Wp + pw
            for q in range(W):
                t = (x[c, b, i, q] + sh) if has_shift else x[c, b, i, q]
                xp[c, o + q] = ((t - mu) * r) * ga + be


@njit(cache=True)
def _fill_copy(x, b, ph, pw, xp):
    """xp[c, (r + ph) Wp + q + pw] = x[c, b, r, q]."""
    C, _, H, W = x.shape
    Wp = W + 2 * pw
    for c in range(C):
        for i in range(H):
            o = (i + ph) * Wp + pw
            xp[c, o:o + W] = x[c, b, i]


@functools.lru_cache(maxsize=None)
def _loop():
    """The per-sample loop (float32), with the SIMD kernels bound in."""
    k1, k2, k3, k4, k5, k6, k7, k8, k9, k10, k11, k12 = [_simd.kernel_function(m, NV, np.dtype(F32))
                                                          for m in range(1, MR + 1)]
    bsilu = _simd.bias_silu_function()

    @cached_njit()
    def gemm(xf, off, wf, Cout, K, ywf, ldy, nw):
        """ywf[co ldy + n] = sum_k wf[co K + k] xf[off[k] + n], in balanced blocks of <= MR channels."""
        nblk = (Cout + MR - 1) // MR                     # balanced blocks: 20 = 10 + 10, not 12 + 8
        for blk in range(nblk):
            c0 = blk * (Cout // nblk) + min(blk, Cout % nblk)
            m = Cout // nblk + (1 if blk < Cout % nblk else 0)
            wp, yp = wf[c0 * K:], ywf[c0 * ldy:]
            if m == 12:
                k12(xf.ctypes, off.ctypes, K, wp.ctypes, K, yp.ctypes, ldy, nw)
            elif m == 11:
                k11(xf.ctypes, off.ctypes, K, wp.ctypes, K, yp.ctypes, ldy, nw)
            elif m == 10:
                k10(xf.ctypes, off.ctypes, K, wp.ctypes, K, yp.ctypes, ldy, nw)
            elif m == 9:
                k9(xf.ctypes, off.ctypes, K, wp.ctypes, K, yp.ctypes, ldy, nw)
            elif m == 8:
                k8(xf.ctypes, off.ctypes, K, wp.ctypes, K, yp.ctypes, ldy, nw)
            elif m == 7:
                k7(xf.ctypes, off.ctypes, K, wp.ctypes, K, yp.ctypes, ldy, nw)
            elif m == 6:
                k6(xf.ctypes, off.ctypes, K, wp.ctypes, K, yp.ctypes, ldy, nw)
            elif m == 5:
                k5(xf.ctypes, off.ctypes, K, wp.ctypes, K, yp.ctypes, ldy, nw)
            elif m == 4:
                k4(xf.ctypes, off.ctypes, K, wp.ctypes, K, yp.ctypes, ldy, nw)
            elif m == 3:
                k3(xf.ctypes, off.ctypes, K, wp.ctypes, K, yp.ctypes, ldy, nw)
            elif m == 2:
                k2(xf.ctypes, off.ctypes, K, wp.ctypes, K, yp.ctypes, ldy, nw)
            else:
                k1(xf.ctypes, off.ctypes, K, wp.ctypes, K, yp.ctypes, ldy, nw)

    @cached_njit(parallel=True)
    def loop(x, norm, shift, has_shift, G, eps, mean, rstd, gamma, beta, silu_in, pad, off, w2, bias, has_b,
             silu_out, Y, xp_s, yw_s):
        """Y (Cout, B, Ho, Wo) of x (C, B, H, W), one sample per iteration (see the module docstring)."""
        C, B = x.shape[:2]
        Cout, K = w2.shape
        Ho = Y.shape[2]
        Wp = x.shape[3] + 2 * pad
        nw, ldx, ldy = Ho * Wp, xp_s.shape[2], yw_s.shape[2]
        wf = w2.reshape(-1)
        for b in prange(B):
            tid = get_thread_id()
            xp, yw = xp_s[tid], yw_s[tid]
            if norm:
                for g in range(G):
                    group_stats(x, shift, has_shift, b, g, G, eps, F32(1), mean, rstd)
                _fill_norm(x, b, shift, has_shift, mean, rstd, gamma, beta, G, pad, pad, xp)
                if silu_in:                      # silu(0) = 0: the padding stays 0
                    for c in range(C):
                        bsilu(xp[c].ctypes, ldx, F32(0.0))
            else:
                _fill_copy(x, b, pad, pad, xp)
            ywf = yw.reshape(-1)
            gemm(xp.reshape(-1), off, wf, Cout, K, ywf, ldy, nw)
            if silu_out:                         # bias + SiLU on the wide rows, in cache
                for co in range(Cout):
                    bsilu(ywf[co * ldy:].ctypes, ldy, bias[co] if has_b else F32(0.0))
                _narrow(yw, b, 1, Wp, ldy, bias, False, Y)
            else:
                _narrow(yw, b, 1, Wp, ldy, bias, has_b, Y)
    return loop


def _run(xc, w, b, padding, silu_out, norm=None):
    """Y (Cout, B, Ho, Wo) of the channel-major xc (C, B, H, W); norm = (shift or None, G, eps,
    gamma, beta, silu_in) for group_norm_conv2d."""
    C, B, H, W = xc.shape
    Cout, _, kH, kW = w.shape
    Hp, Wp = H + 2 * padding, W + 2 * padding
    Ho = Hp - kH + 1
    L = _simd.LANES[np.dtype(F32)]
    ldx = -(-(Hp * Wp + _slack(w)) // L) * L             # whole vectors: SiLU runs on the whole plane
    ldy = -(-(Ho * Wp) // (L * NV)) * (L * NV)
    off = conv_v5._taps(C, kH, kW, ldx, Wp)
    T = get_num_threads()
    xp_s = np.zeros((T, C, ldx), F32)                    # padding: zero for the whole call
    yw_s = np.empty((T, Cout, ldy), F32)
    Y = np.empty((Cout, B, Ho, Wp - kW + 1), F32)
    w2 = np.ascontiguousarray(w.reshape(Cout, -1), dtype=F32)
    bias = np.zeros(Cout, F32) if b is None else np.ascontiguousarray(b, dtype=F32)
    if norm is None:
        z = np.zeros((1, 1), F32)
        args = (False, np.zeros((B, C), F32), False, 1, F32(0), z, z, np.zeros(C, F32), np.zeros(C, F32), False)
    else:
        shift, G, eps, gamma, beta, silu_in = norm
        sh = np.zeros((B, C), F32) if shift is None else np.ascontiguousarray(np.broadcast_to(shift, (B, C)), dtype=F32)
        args = (True, sh, shift is not None, G, F32(eps), np.empty((B, G), F32), np.empty((B, G), F32),
                np.ascontiguousarray(gamma, dtype=F32), np.ascontiguousarray(beta, dtype=F32), bool(silu_in))
    _loop()(xc, *args, padding, off, w2, bias, b is not None, bool(silu_out), Y, xp_s, yw_s)
    return nchw(Y)


def conv2d_silu_forward_v3(x, w, b, stride=1, padding=0):
    stride, padding = _check_conv("conv2d", x, w, b, stride, padding, cin_axis=1)
    x = native(x)
    if not _fast_applies(x, w, stride, padding):
        y, cache = ref_fused.conv2d_silu_forward_with(NEWEST, x, w, b, stride, padding)
        return y, ("composed", cache)
    return _run(cm(x), w, b, padding, True), ("inputs", (x, w, b, stride, padding))


def group_norm_conv2d_forward_v3(x, num_groups, gamma, beta, w, b, shift=None, stride=1, padding=0,
                                 silu_in=False, silu_out=False, eps=1e-5):
    args = (x, num_groups, gamma, beta, w, b, shift, stride, padding, silu_in, silu_out, eps)
    stride, padding = _check_conv("conv2d", x, w, b, stride, padding, cin_axis=1)
    _check_norm(x, num_groups, gamma, beta)
    x = native(x)
    if not _fast_applies(x, w, stride, padding):
        y, cache = ref_fused.group_norm_conv2d_forward_with(NEWEST, *args)
        return y, ("composed", cache)
    y = _run(cm(x), w, b, padding, silu_out, (shift, num_groups, eps, gamma, beta, silu_in))
    return y, ("inputs", args)


KERNELS = {"conv2d_silu": {3: (conv2d_silu_forward_v3, conv2d_silu_backward_v2)},
           "group_norm_conv2d": {3: (group_norm_conv2d_forward_v3, group_norm_conv2d_backward_v2)}}
