"""The fused pairs of refdiff/nn/fused.py on the numba backend (CPU): conv2d_silu and
group_norm_conv2d. Twins of refdiff.nn.fused; the models' inference forward calls them.

Version 1 runs the reference's composition (refdiff.nn.fused.*_with) on this backend's
literal ports (every op at version 1): the same code, other ops, no copy of it.

Version 2 does the whole fused op in conv2d version 5's implicit-GEMM frame (float32):

    input pass   GroupNorm's statistics per (sample, group) as group_norm version 2 takes
                 them (float64 sums, mean and variance rounded to the dtype, two passes; the
                 sums may regroup the shift with the mean, see group_stats); then ONE pass writes
                 ((x + shift - mu) rstd) gamma + beta  into the zero-padded planes the
                 convolution reads, and SiLU (silu_in) runs in place over each padded plane
                 (_simd bsilu32; silu(0) = 0 keeps the padding 0). The normalised activation
                 is never written as an array of its own.
    GEMM         conv2d v5's SIMD micro-kernel, in blocks of up to 12 output channels (v5
                 takes 8): 12 x 2 vectors of accumulators still fit AVX-512's 32 registers,
                 and each loaded input vector then feeds more FMAs. unet-seed's 10-channel
                 layers run as one block of 10 instead of two of 5 (measured on one core:
                 98 against 65 GFLOP/s).
    epilogue     bias and SiLU (silu_out) in place on each sample's wide output rows while
                 they are in cache (bsilu32: x <- silu(x + b), silu_v3's formula), then the
                 valid columns are copied out (conv_v4._narrow).

What a backward needs is not kept: the cache is the op's inputs, and the backward reruns
the composition on the newest ops (conv2d v6, group_norm v2, silu v3) and walks it back,
so the pair is complete while the inference forward stores nothing. Convolutions this
frame does not take (strides, images no larger than the kernel, 1x1 convs, float64) run
that composition of the newest ops directly. As in conv2d v5's frame, the sums run in
another order than the reference's; SiLU is silu_v3's (<= 3 ulp); all within
refdiff_cuda.testing.TOL of the reference pair (tests/test_fused_ops.py).
"""
from __future__ import annotations

import functools
import math
import types

import numpy as np
from numba import get_num_threads, get_thread_id, njit, prange

from refdiff.nn import fused as ref_fused
from refdiff.nn.conv import _check_conv, _conv_out
from refdiff.nn.norm import _check as _check_norm

from . import _simd, conv, conv_v5, conv_v6, functional, norm, silu_v3
from ._cache import cached_njit
from ._layout import cm, native, nchw
from .conv_v4 import _dense_applies, _narrow, _pad_planes, _wide_applies

MR, NV = 12, 2          # at most MR output channels x NV vectors of pixels per micro-kernel call

# The op namespaces the compositions run on: every op at version 1 (the literal ports), and
# every op at its newest version (the backward of version 2, and its other convolutions).
V1 = types.SimpleNamespace(
    conv2d_forward=conv.conv2d_forward_v1, conv2d_backward=conv.conv2d_backward_v1,
    silu_forward=functional.silu_forward_v1, silu_backward=functional.silu_backward_v1,
    group_norm_forward=norm.group_norm_forward_v1, group_norm_backward=norm.group_norm_backward_v1,
    add_channel_bias_forward=functional.add_channel_bias_forward_v1,
    add_channel_bias_backward=functional.add_channel_bias_backward_v1)
NEWEST = types.SimpleNamespace(
    conv2d_forward=conv_v6.conv2d_forward_v6, conv2d_backward=conv_v6.conv2d_backward_v6,
    silu_forward=silu_v3.silu_forward_v3, silu_backward=silu_v3.silu_backward_v3,
    group_norm_forward=norm.group_norm_forward_v2, group_norm_backward=norm.group_norm_backward_v2,
    add_channel_bias_forward=functional.add_channel_bias_forward_v2,
    add_channel_bias_backward=functional.add_channel_bias_backward_v2)


# ================================ version 1: the reference's composition ======================
def conv2d_silu_forward_v1(x, w, b, stride=1, padding=0):
    return ref_fused.conv2d_silu_forward_with(V1, x, w, b, stride, padding)


def conv2d_silu_backward_v1(dy, cache):
    return ref_fused.conv2d_silu_backward_with(V1, dy, cache)


def group_norm_conv2d_forward_v1(x, num_groups, gamma, beta, w, b, shift=None, stride=1, padding=0,
                                 silu_in=False, silu_out=False, eps=1e-5):
    return ref_fused.group_norm_conv2d_forward_with(V1, x, num_groups, gamma, beta, w, b, shift, stride, padding,
                                                    silu_in, silu_out, eps)


def group_norm_conv2d_backward_v1(dy, cache):
    return ref_fused.group_norm_conv2d_backward_with(V1, dy, cache)


# ================================ version 2: one kernel =======================================
_SUM = dict(cache=True, fastmath={"reassoc", "nsz", "arcp", "contract"})   # sums only: see norm.py


@njit(**_SUM)
def _plane_sum(x, c, b, sh, has_shift):
    """sum of x[c, b] (+ sh), float64, x C-contiguous: one flat loop over the plane, the
    shift's branch outside it (so that it vectorises; row by row with the branch inside, the
    statistics cost as much as the convolution's input pass and SiLU together)."""
    n = x.shape[2] * x.shape[3]
    xf = x.reshape(-1)[(c * x.shape[1] + b) * n:]
    acc = 0.0
    if has_shift:
        for k in range(n):
            acc += xf[k] + sh
    else:
        for k in range(n):
            acc += xf[k]
    return acc


@njit(**_SUM)
def _plane_sqdev(x, c, b, sh, has_shift, mu):
    """sum of (x[c, b] (+ sh) - mu)^2, float64, as _plane_sum."""
    n = x.shape[2] * x.shape[3]
    xf = x.reshape(-1)[(c * x.shape[1] + b) * n:]
    acc = 0.0
    if has_shift:
        for k in range(n):
            d = np.float64((xf[k] + sh) - mu)
            acc += d * d
    else:
        for k in range(n):
            d = np.float64(xf[k] - mu)
            acc += d * d
    return acc


@njit(cache=True)
def group_stats(x, shift, has_shift, b, g, G, eps, one, mean, rstd):
    """mean[b, g], rstd[b, g] of sample b, group g of x (C, B, H, W) [+ shift (B, C)]: group_norm
    v2's two-pass float64 sums (also version 3's, refdiff_cuda/numba_cpu/fused_v3.py). With a
    shift, the reassociating sums may take x + (shift - mu) for (x + shift) - mu: group_norm v2
    on x + shift can differ in the last bits of rstd, within TOL."""
    Cg = x.shape[0] // G
    n = Cg * x.shape[2] * x.shape[3]
    acc = 0.0
    for c in range(g * Cg, (g + 1) * Cg):
        acc += _plane_sum(x, c, b, shift[b, c], has_shift)
    mean[b, g] = acc / n                                # stored: rounded to the dtype
    mu = mean[b, g]
    acc = 0.0
    for c in range(g * Cg, (g + 1) * Cg):
        acc += _plane_sqdev(x, c, b, shift[b, c], has_shift, mu)
    rstd[b, g] = acc / n                                # var, rounded to the dtype
    rstd[b, g] = one / math.sqrt(rstd[b, g] + eps)


@njit(parallel=True, cache=True)
def _gn_stats(x, shift, has_shift, G, eps, one, mean, rstd):
    """mean, rstd (B, G) of x (C, B, H, W) [+ shift (B, C)], as group_norm v2 computes them."""
    B = x.shape[1]
    for task in prange(B * G):
        group_stats(x, shift, has_shift, task // G, task % G, G, eps, one, mean, rstd)


@njit(cache=True)
def _norm_plane(x, c, b, sh, has_shift, mu, r, ga, be, ph, pw, out, base):
    """out[base + (i + ph) Wp + q + pw] = ((x[c, b, i, q] + sh - mu) r) ga + be: one channel of one
    sample, normalised, into its zero-padded plane (versions 2 and 3's input pass)."""
    H, W = x.shape[2], x.shape[3]
    Wp = W + 2 * pw
    for i in range(H):
        o = base + (i + ph) * Wp + pw
        for q in range(W):
            t = (x[c, b, i, q] + sh) if has_shift else x[c, b, i, q]
            out[o + q] = ((t - mu) * r) * ga + be


@functools.lru_cache(maxsize=None)
def _blocks():
    """(block, gemm) for float32, with the SIMD kernels for 1..MR rows bound in: the micro-kernel
    calls of versions 2 and 3 (and version 3's dense product)."""
    k1, k2, k3, k4, k5, k6, k7, k8, k9, k10, k11, k12 = [_simd.kernel_function(m, NV, np.dtype(np.float32))
                                                          for m in range(1, MR + 1)]

    @cached_njit()
    def block(m, xf, off, K, wp, yp, ldy, nw):
        """yp[r ldy + n] = sum_k wp[r K + k] xf[off[k] + n] for r < m <= MR (one kernel call)."""
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

    @cached_njit()
    def gemm(xf, off, wf, Cout, K, ywf, ldy, nw):
        """ywf[co ldy + n] = sum_k wf[co K + k] xf[off[k] + n], in balanced blocks of <= MR channels."""
        nblk = (Cout + MR - 1) // MR                     # balanced blocks: 20 = 10 + 10, not 12 + 8
        for blk in range(nblk):
            c0 = blk * (Cout // nblk) + min(blk, Cout % nblk)
            m = Cout // nblk + (1 if blk < Cout % nblk else 0)
            block(m, xf, off, K, wf[c0 * K:], ywf[c0 * ldy:], ldy, nw)
    return block, gemm


@functools.lru_cache(maxsize=None)
def _kernels():
    """(pad_norm, conv_loop) for float32, with the SIMD kernels bound in."""
    gemm = _blocks()[1]
    bsilu = _simd.bias_silu_function()

    @cached_njit()
    def silu_run(a, n):
        """a[:n] <- silu(a[:n]) in place: whole vectors by the kernel, the last n % 16 as silu_v3's tail."""
        main = n - n % 16
        if main > 0:
            bsilu(a.ctypes, main, np.float32(0.0))
        for i in range(main, n):
            z = a[i]
            s = np.float32(0.0) if -z > 88.0 else np.float32(1.0 / (1.0 + math.exp(-z)))
            a[i] = z * (s if z == z else z)

    @cached_njit(parallel=True)
    def pad_norm(x, shift, has_shift, mean, rstd, gamma, beta, silu_in, ph, pw, xp):
        """xp[c, b Hp Wp + (r + ph) Wp + q + pw] = ((x + shift - mu) rstd) gamma + beta [-> SiLU]."""
        C, B, H, W = x.shape
        G = mean.shape[1]
        Cg = C // G
        Hp, Wp = H + 2 * ph, W + 2 * pw
        for task in prange(C * B):
            c, b = task // B, task % B
            g = c // Cg
            base = b * Hp * Wp
            _norm_plane(x, c, b, shift[b, c], has_shift, mean[b, g], rstd[b, g], gamma[c], beta[c], ph, pw, xp[c],
                        base)
            if silu_in:
                silu_run(xp[c, base:base + Hp * Wp], Hp * Wp)

    @cached_njit(parallel=True)
    def conv_loop(xp, HpWp, Wp, off, w2, bias, has_b, silu_out, Y, yw_s, ldy):
        Cout, K = w2.shape
        B, Ho = Y.shape[1], Y.shape[2]
        nw = Ho * Wp
        xf, wf = xp.reshape(-1), w2.reshape(-1)
        for b in prange(B):
            yw = yw_s[get_thread_id()]
            ywf = yw.reshape(-1)
            gemm(xf[b * HpWp:], off, wf, Cout, K, ywf, ldy, nw)
            if silu_out:                                  # bias + SiLU on the wide rows, in cache
                for co in range(Cout):
                    bsilu(ywf[co * ldy:].ctypes, ldy, bias[co] if has_b else np.float32(0.0))
                _narrow(yw, b, 1, Wp, ldy, bias, False, Y)
            else:
                _narrow(yw, b, 1, Wp, ldy, bias, has_b, Y)
    return pad_norm, conv_loop


def _fast_applies(x, w, stride, padding):
    """Version 2's own frame: float32, stride 1, padding < kernel, images larger than the kernel."""
    kH, kW = w.shape[2:]
    return (x.dtype == np.float32 and _wide_applies(stride, padding, kH, kW)
            and not _dense_applies(x.shape[2], x.shape[3], kH, kW) and not (kH == kW == 1 and padding == 0))


def _fused_conv(xp, shape, w, b, padding, silu_out):
    """The convolution of the padded planes xp of a (C, B, H, W) input -> Y (Cout, B, Ho, Wo)."""
    C, B, H, W = shape
    Cout, _, kH, kW = w.shape
    Hp, Wp = H + 2 * padding, W + 2 * padding
    Ho = Hp - kH + 1
    L = _simd.LANES[np.dtype(np.float32)] * NV
    off = conv_v5._taps(C, kH, kW, xp.shape[1], Wp)
    w2 = np.ascontiguousarray(w.reshape(Cout, -1), dtype=np.float32)
    ldy = -(-(Ho * Wp) // L) * L
    Y = np.empty((Cout, B, Ho, Wp - kW + 1), np.float32)
    bias = np.zeros(Cout, np.float32) if b is None else np.ascontiguousarray(b, dtype=np.float32)
    _kernels()[1](xp, Hp * Wp, Wp, off, w2, bias, b is not None, silu_out, Y,
                  np.empty((get_num_threads(), Cout, ldy), np.float32), ldy)
    return nchw(Y)


def _checked(x, w, b, stride, padding, norm=None):
    """The reference's checks of a fused pair's arguments, norm = (num_groups, gamma, beta) for
    group_norm_conv2d -> (x in the machine's byte order, stride, padding). The kernel larger than
    the padded input is refused before any frame is sized (a frame with no output rows would let
    the micro-kernel write past its buffer)."""
    stride, padding = _check_conv("conv2d", x, w, b, stride, padding, cin_axis=1)
    for n, k in zip(np.shape(x)[2:], np.shape(w)[2:]):
        _conv_out("conv2d", n, k, stride, padding)
    if norm is not None:
        _check_norm(x, *norm)
    return native(x), stride, padding


def _slack(w):
    return w.shape[3] - 1 + _simd.LANES[np.dtype(np.float32)] * NV     # the kernel reads whole vectors


def conv2d_silu_forward_v2(x, w, b, stride=1, padding=0):
    x, stride, padding = _checked(x, w, b, stride, padding)
    if not _fast_applies(x, w, stride, padding):
        y, cache = ref_fused.conv2d_silu_forward_with(NEWEST, x, w, b, stride, padding)
        return y, ("composed", cache)
    xc = cm(x)
    y = _fused_conv(_pad_planes(xc, padding, padding, _slack(w)), xc.shape, w, b, padding, True)
    return y, ("inputs", (x, w, b, stride, padding))


def conv2d_silu_backward_v2(dy, cache):
    kind, cache = cache
    if kind == "inputs":                       # rerun the composition, keep its caches this time
        _, cache = ref_fused.conv2d_silu_forward_with(NEWEST, *cache)
    return ref_fused.conv2d_silu_backward_with(NEWEST, dy, cache)


def group_norm_conv2d_forward_v2(x, num_groups, gamma, beta, w, b, shift=None, stride=1, padding=0,
                                 silu_in=False, silu_out=False, eps=1e-5):
    args = (x, num_groups, gamma, beta, w, b, shift, stride, padding, silu_in, silu_out, eps)
    x, stride, padding = _checked(x, w, b, stride, padding, (num_groups, gamma, beta))
    if not _fast_applies(x, w, stride, padding):
        y, cache = ref_fused.group_norm_conv2d_forward_with(NEWEST, *args)
        return y, ("composed", cache)
    xc = cm(x)
    C, B, H, W = xc.shape
    f32 = np.float32
    sh = np.zeros((B, C), f32) if shift is None else np.ascontiguousarray(np.broadcast_to(shift, (B, C)), dtype=f32)
    mean, rstd = np.empty((B, num_groups), f32), np.empty((B, num_groups), f32)
    _gn_stats(xc, sh, shift is not None, num_groups, f32(eps), f32(1), mean, rstd)
    xp = np.zeros((C, B * (H + 2 * padding) * (W + 2 * padding) + _slack(w)), f32)
    _kernels()[0](xc, sh, shift is not None, mean, rstd, np.ascontiguousarray(gamma, dtype=f32),
                  np.ascontiguousarray(beta, dtype=f32), bool(silu_in), padding, padding, xp)
    y = _fused_conv(xp, xc.shape, w, b, padding, bool(silu_out))
    return y, ("inputs", args)


def group_norm_conv2d_backward_v2(dy, cache):
    kind, cache = cache
    if kind == "inputs":
        _, cache = ref_fused.group_norm_conv2d_forward_with(NEWEST, *cache)
    return ref_fused.group_norm_conv2d_backward_with(NEWEST, dy, cache)


KERNELS = {
    "conv2d_silu": {1: (conv2d_silu_forward_v1, conv2d_silu_backward_v1),
                    2: (conv2d_silu_forward_v2, conv2d_silu_backward_v2)},
    "group_norm_conv2d": {1: (group_norm_conv2d_forward_v1, group_norm_conv2d_backward_v1),
                          2: (group_norm_conv2d_forward_v2, group_norm_conv2d_backward_v2)},
}
