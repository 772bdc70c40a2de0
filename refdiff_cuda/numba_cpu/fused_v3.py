"""The fused pairs conv2d_silu and group_norm_conv2d, version 3 (numba, CPU): version 2's
arithmetic (fused.py) done one sample at a time, and tiny images as one dense product.
Twins of refdiff.nn.fused.

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
                 stays 0: only SiLU, with silu(0) = 0, runs over it);
    GEMM         the SIMD micro-kernel on those planes, in blocks of up to 12 output channels
                 (fused.MR, as version 2);
    epilogue     bias and SiLU on the wide output rows, then their valid columns into y.

Everything between reading x and writing y stays in the core's caches. On this frame the
arithmetic is version 2's, term for term (the same kernels, the same order), except that
SiLU on the input runs on whole vectors of each plane where version 2 ran its last n % 16
entries through silu_v3's scalar formula. Images no larger than the kernel (any stride)
are not version 2's: one product with the dense matrix (_dense_run), where version 2 ran
the composition of the newest ops (group_norm v2, silu v3, conv2d's dense path through
BLAS); the sums run in another order, within refdiff_cuda.testing.TOL of the reference as
every version. Other convolutions the frame does not take (strides, 1x1 convs, float64) run
that composition; the backward is version 2's (it reruns the composition with its caches).
"""
from __future__ import annotations

import functools

import numpy as np
from numba import get_num_threads, get_thread_id, njit, prange

from refdiff.nn import fused as ref_fused
from refdiff.nn.conv import _conv_out

from . import _simd, conv_v4, conv_v5, fused
from ._cache import cached_njit
from ._layout import cm, nchw
from .conv_v4 import _narrow
from .fused import (MR, NEWEST, NV, _checked, _fast_applies, _norm_plane, _slack, conv2d_silu_backward_v2,
                    group_norm_conv2d_backward_v2, group_stats)

F32 = np.float32


@njit(cache=True)
def _fill_norm(x, b, shift, has_shift, mean, rstd, gamma, beta, G, ph, pw, xp):
    """xp[c, (r + ph) Wp + q + pw] = ((x[c, b, r, q] + shift[b, c] - mu) rstd) gamma[c] + beta[c]."""
    Cg = x.shape[0] // G
    for c in range(x.shape[0]):
        g = c // Cg
        _norm_plane(x, c, b, shift[b, c], has_shift, mean[b, g], rstd[b, g], gamma[c], beta[c], ph, pw, xp[c], 0)


@njit(cache=True)
def _fill_copy(x, b, ph, pw, xp):
    """xp[c, (r + ph) Wp + q + pw] = x[c, b, r, q]. Element by element: a row slice copy
    (xp[c, o:o + W] = x[c, b, i]) builds two array views per row, and cost 4x as much."""
    C, _, H, W = x.shape
    Wp = W + 2 * pw
    for c in range(C):
        for i in range(H):
            o = (i + ph) * Wp + pw
            for q in range(W):
                xp[c, o + q] = x[c, b, i, q]


@functools.lru_cache(maxsize=None)
def _loop():
    """The per-sample loop (float32), with the SIMD kernels bound in."""
    block, gemm = fused._blocks()
    bsilu = _simd.bias_silu_function()

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

    @cached_njit(parallel=True)
    def dense(x, norm, shift, has_shift, G, mean, rstd, gamma, beta, silu_in, off, wdt, bias, has_b, silu_out, Y,
              xt, yt):
        """Y (Cout, B, Ho, Wo) of x (C, B, H, W) as one product with the dense matrix wdt (see _dense_run)."""
        C, B, H, W = x.shape
        Cout, _, Ho, Wo = Y.shape
        N, K = wdt.shape
        Bp = xt.shape[1]
        HW, P, Cg = H * W, Ho * Wo, C // G
        for c in prange(C):                              # input pass: xt[(c, pixel), b]
            g = c // Cg
            for b in range(B):
                mu, r, sh = mean[b, g], rstd[b, g], shift[b, c]
                for i in range(H):
                    for q in range(W):
                        t = (x[c, b, i, q] + sh) if has_shift else x[c, b, i, q]
                        xt[c * HW + i * W + q, b] = ((t - mu) * r) * gamma[c] + beta[c] if norm else t
            if silu_in:                                  # silu(0) = 0: the padding columns stay 0
                for k in range(c * HW, (c + 1) * HW):
                    bsilu(xt[k].ctypes, Bp, F32(0.0))
        nblk = (N + MR - 1) // MR                        # GEMM: yt (N, Bp) = wdt (N, K) xt (K, Bp)
        xf, wf, yf = xt.reshape(-1), wdt.reshape(-1), yt.reshape(-1)
        for blk in prange(nblk):
            r0 = blk * (N // nblk) + min(blk, N % nblk)
            m = N // nblk + (1 if blk < N % nblk else 0)
            block(m, xf, off, K, wf[r0 * K:], yf[r0 * Bp:], Bp, B)
        for co in prange(Cout):                          # epilogue: bias [+ SiLU], back to (Cout, B, Ho, Wo)
            bc = bias[co] if has_b else F32(0.0)
            for p in range(P):
                row = co * P + p
                if silu_out:
                    bsilu(yt[row].ctypes, Bp, bc)
                for b in range(B):
                    Y[co, b, p // Wo, p % Wo] = yt[row, b] if silu_out else yt[row, b] + bc
    return loop, dense


# Dense matrices of the tiny-image convolutions (see _dense_run), by weight array:
# (id(w), shape, H, W, stride, padding) -> (a copy of w, the matrix); used only while w still
# holds those very bits (compared on every call), the oldest dropped once copies and matrices
# pass _DENSE_BYTES (an entry outlives its weight array until then: a recycled id finds other
# bits and rebuilds).
_DENSE = {}
_DENSE_BYTES = 256 << 20


def _dense_matrix(w, H, W, Ho, Wo, stride, padding):
    """WdT (Cout Ho Wo, Cin H W): row (co, ro, qo) holds the weight each input pixel has in that
    output (conv_v4._dense_weight, transposed), from the cache while w is unchanged."""
    key = (id(w), w.shape, H, W, stride, padding)
    w32 = np.ascontiguousarray(w, dtype=F32)
    hit = _DENSE.pop(key, None)
    if hit is None or not np.array_equal(hit[0].view(np.uint32), w32.view(np.uint32)):
        hit = (w32.copy(), np.ascontiguousarray(conv_v4._dense_weight(w32, H, W, Ho, Wo, stride, padding).T))
        while _DENSE and sum(v[0].nbytes + v[1].nbytes for v in _DENSE.values()) + hit[0].nbytes + \
                hit[1].nbytes > _DENSE_BYTES:
            del _DENSE[next(iter(_DENSE))]
    _DENSE[key] = hit                                    # the newest last
    return hit[1]


def _norm_args(xc, norm):
    """The per-sample loops' GroupNorm arguments for norm = (shift, G, eps, gamma, beta, silu_in)
    or None (then zeros that the loops do not use, and no norm)."""
    C, B = xc.shape[:2]
    if norm is None:
        return False, np.zeros((B, C), F32), False, 1, F32(0), np.zeros((B, 1), F32), np.zeros((B, 1), F32), \
            np.zeros(C, F32), np.zeros(C, F32), False
    shift, G, eps, gamma, beta, silu_in = norm
    sh = np.zeros((B, C), F32) if shift is None else np.ascontiguousarray(np.broadcast_to(shift, (B, C)), dtype=F32)
    return (True, sh, shift is not None, G, F32(eps), np.empty((B, G), F32), np.empty((B, G), F32),
            np.ascontiguousarray(gamma, dtype=F32), np.ascontiguousarray(beta, dtype=F32), bool(silu_in))


def _dense_run(xc, w, b, stride, padding, silu_out, norm=None):
    """Y (Cout, B, Ho, Wo) of a convolution of an image no larger than its kernel (H W <= kH kW,
    unet-seed's 3 x 3 and 1 x 1 stages), as conv2d v4's dense path computes it: every output
    pixel is a dot product of the whole input of its sample with a row of the dense matrix, so
    the batch is ONE product, yt (Cout Ho Wo, B) = WdT xt (Cin H W, B), by the SIMD kernel
    (blocks of MR rows on the threads, the batch as its vectors). The input pass writes the
    normalised [SiLU] input feature-major (xt), the epilogue adds bias [SiLU] and writes Y.
    GroupNorm's statistics are fused.group_stats' (fused._gn_stats). The matrix is built once
    per weight array (_dense_matrix) instead of on every call (0.3-0.5 ms for 80 -> 80, B = 64)."""
    C, B, H, W = xc.shape
    Cout, _, kH, kW = w.shape
    Ho, Wo = _conv_out("conv2d", H, kH, stride, padding), _conv_out("conv2d", W, kW, stride, padding)
    wdt = _dense_matrix(w, H, W, Ho, Wo, stride, padding)
    args = _norm_args(xc, norm)
    if args[0]:
        fused._gn_stats(xc, args[1], args[2], args[3], args[4], F32(1), args[5], args[6])
    Bp = -(-B // (_simd.LANES[np.dtype(F32)] * NV)) * (_simd.LANES[np.dtype(F32)] * NV)
    K = C * H * W
    off = conv_v5._taps(K, 1, 1, Bp, 1)                 # off[k] = k Bp: row k of xt
    xt, yt = np.zeros((K, Bp), F32), np.empty((wdt.shape[0], Bp), F32)
    Y = np.empty((Cout, B, Ho, Wo), F32)
    bias = np.zeros(Cout, F32) if b is None else np.ascontiguousarray(b, dtype=F32)
    a = args[:4] + args[5:]                               # eps is not needed: the statistics are taken
    _loop()[1](xc, *a, off, wdt, bias, b is not None, bool(silu_out), Y, xt, yt)
    return Y


def _frame(shape, w, padding):
    """(Wp, Ho, ldx, ldy, off) of the per-sample frame of a (C, B, H, W) input: padded rows of Wp,
    Ho output rows, ldx floats per channel's padded plane, ldy per output channel's wide rows,
    and the taps' offsets into the planes."""
    C, _, H, W = shape
    kH, kW = w.shape[2:]
    Hp, Wp = H + 2 * padding, W + 2 * padding
    Ho = Hp - kH + 1
    L = _simd.LANES[np.dtype(F32)]
    ldx = -(-(Hp * Wp + _slack(w)) // L) * L             # whole vectors: SiLU runs on the whole plane
    ldy = -(-(Ho * Wp) // (L * NV)) * (L * NV)
    return Wp, Ho, ldx, ldy, conv_v5._taps(C, kH, kW, ldx, Wp)


def _run(xc, w, b, padding, silu_out, norm=None):
    """Y (Cout, B, Ho, Wo) of the channel-major xc (C, B, H, W); norm = (shift or None, G, eps,
    gamma, beta, silu_in) for group_norm_conv2d."""
    C, B = xc.shape[:2]
    Cout, _, kH, kW = w.shape
    Wp, Ho, ldx, ldy, off = _frame(xc.shape, w, padding)
    T = get_num_threads()
    xp_s = np.zeros((T, C, ldx), F32)                    # padding: zero for the whole call
    yw_s = np.empty((T, Cout, ldy), F32)
    Y = np.empty((Cout, B, Ho, Wp - kW + 1), F32)
    w2 = np.ascontiguousarray(w.reshape(Cout, -1), dtype=F32)
    bias = np.zeros(Cout, F32) if b is None else np.ascontiguousarray(b, dtype=F32)
    args = _norm_args(xc, norm)
    _loop()[0](xc, *args, padding, off, w2, bias, b is not None, bool(silu_out), Y, xp_s, yw_s)
    return nchw(Y)


def _dense_fast(x, w):
    """_dense_run's case: float32, an image no larger than the kernel (conv2d v4's dense path)."""
    return x.dtype == np.float32 and conv_v4._dense_applies(x.shape[2], x.shape[3], w.shape[2], w.shape[3])


def conv2d_silu_forward_v3(x, w, b, stride=1, padding=0):
    x, stride, padding = _checked(x, w, b, stride, padding)
    if _dense_fast(x, w):
        y = _dense_run(cm(x), w, b, stride, padding, True)
        if not np.isnan(y).any():
            return nchw(y), ("inputs", (x, w, b, stride, padding))
    elif _fast_applies(x, w, stride, padding):
        return _run(cm(x), w, b, padding, True), ("inputs", (x, w, b, stride, padding))
    y, cache = ref_fused.conv2d_silu_forward_with(NEWEST, x, w, b, stride, padding)
    return y, ("composed", cache)


def group_norm_conv2d_forward_v3(x, num_groups, gamma, beta, w, b, shift=None, stride=1, padding=0,
                                 silu_in=False, silu_out=False, eps=1e-5):
    args = (x, num_groups, gamma, beta, w, b, shift, stride, padding, silu_in, silu_out, eps)
    x, stride, padding = _checked(x, w, b, stride, padding, (num_groups, gamma, beta))
    norm = (shift, num_groups, eps, gamma, beta, silu_in)
    if _dense_fast(x, w):
        y = _dense_run(cm(x), w, b, stride, padding, silu_out, norm)
        if not np.isnan(y).any():
            return nchw(y), ("inputs", args)
    elif _fast_applies(x, w, stride, padding):
        return _run(cm(x), w, b, padding, silu_out, norm), ("inputs", args)
    y, cache = ref_fused.group_norm_conv2d_forward_with(NEWEST, *args)
    return y, ("composed", cache)


KERNELS = {"conv2d_silu": {3: (conv2d_silu_forward_v3, conv2d_silu_backward_v2)},
           "group_norm_conv2d": {3: (group_norm_conv2d_forward_v3, group_norm_conv2d_backward_v2)}}
