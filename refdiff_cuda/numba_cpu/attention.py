"""Numba (CPU) twins of refdiff/nn/attention.py: spatial_attention, upsample_nearest2x, dropout.

The formulas, shapes and citations are in refdiff/nn/attention.py; these must agree with it
(refdiff_cuda.testing.check_op, tests/test_backend_ops.py). Shape glossary: B batch, C
channels, N = H W positions, d = C / heads channels per head.

Version 1 is a literal, serial port: per (sample, head) S = q^T k (np.dot) times 1/sqrt(d),
the row softmax, y = v A^T, and the backward's five products, each as the reference writes
it; upsampling and the dropout multiply as plain loops over C-contiguous NCHW arrays.

Version 2 works on channel-major buffers (_layout.py: the (C, B, H, W) buffer whose NCHW
view the convs return and take), in parallel:
  spatial_attention  one task per (sample, head); q, k, v of a head are (d, N) matrices
      inside the (3C, B, N) buffer (qkv from the 1x1 conv arrives this way, no copy), so each
      of the 2 forward and 4 backward products is one single-threaded BLAS call on the buffers
      (_blas.gemm_t, leading dimension B N); the softmax and its backward are loops over
      contiguous rows with float64 row sums. y and dqkv are channel-major buffers, so the
      output 1x1 conv reads y without a copy. Cache: the qkv buffer and A (B heads, N, N).
  upsample_nearest2x  one task per (channel, sample) plane; backward adds each 2 x 2 block
      as (top-left + top-right) + (bottom-left + bottom-right).
  dropout  the mask is drawn on the host exactly as the reference draws it
      (`rng.random(x.shape) >= p`: float64 uniforms in C order of the NCHW shape), so a
      seed gives the same mask on every backend; one parallel pass compares the uniforms
      with p, multiplies x by 1/(1 - p) or 0 (the reference's mask values, rounded to the
      dtype as it rounds them: the product is bit for bit the reference's) and keeps the
      0/1 mask as bytes in x's memory order; the backward is one pass dy x the same factor.
      x may be NCHW or a channel-major view; y has x's layout.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from refdiff.nn.attention import _check_heads, _dropout_uniforms

from ._blas import gemm_t
from ._layout import cm, nchw

_JIT = dict(cache=True, fastmath=False)


# ================================ spatial_attention ============================================
# --- version 1: literal port -------------------------------------------------------------------
@njit(**_JIT)
def _softmax_rows_v1(s):
    a = np.empty_like(s)
    for n in range(s.shape[0]):
        mx = s[n, 0]
        for m in range(1, s.shape[1]):
            mx = max(mx, s[n, m])
        tot = np.zeros(1, s.dtype)      # the reference sums in the dtype
        for m in range(s.shape[1]):
            a[n, m] = math.exp(s[n, m] - mx)
            tot[0] += a[n, m]
        for m in range(s.shape[1]):
            a[n, m] = a[n, m] / tot[0]
    return a


@njit(**_JIT)
def _attn_fwd_v1(q, k, v, scale):
    B, heads, d, N = q.shape                       # q, k, v (B, heads, d, N)
    a = np.empty((B, heads, N, N), q.dtype)
    y = np.empty((B, heads, d, N), q.dtype)
    for b in range(B):
        for h in range(heads):
            s = np.dot(np.ascontiguousarray(q[b, h].T), k[b, h]) * scale      # (N, N)
            a[b, h] = _softmax_rows_v1(s)
            y[b, h] = np.dot(v[b, h], np.ascontiguousarray(a[b, h].T))       # (d, N)
    return y, a


@njit(**_JIT)
def _attn_bwd_v1(dy, q, k, v, a, scale):
    B, heads, d, N = q.shape
    dq, dk, dv = np.empty_like(q), np.empty_like(k), np.empty_like(v)
    for b in range(B):
        for h in range(heads):
            ab = a[b, h]
            dv[b, h] = np.dot(dy[b, h], ab)
            da = np.dot(np.ascontiguousarray(dy[b, h].T), v[b, h])             # (N, N)
            ds = np.empty_like(da)
            r = np.zeros(1, q.dtype)        # rowsum(dA * A) in the dtype
            for n in range(N):
                r[0] = 0
                for m in range(N):
                    r[0] += da[n, m] * ab[n, m]
                for m in range(N):
                    ds[n, m] = ab[n, m] * (da[n, m] - r[0])
            dq[b, h] = np.dot(k[b, h], np.ascontiguousarray(ds.T)) * scale
            dk[b, h] = np.dot(q[b, h], ds) * scale
    return dq, dk, dv


def spatial_attention_forward_v1(qkv, heads=1):
    _check_heads(qkv, heads)
    qkv = np.ascontiguousarray(qkv)
    B, C3, H, W = qkv.shape
    d = C3 // 3 // heads
    parts = qkv.reshape(B, 3, heads, d, H * W)
    q, k, v = (np.ascontiguousarray(parts[:, i]) for i in range(3))
    scale = qkv.dtype.type(1.0 / math.sqrt(d))
    y, a = _attn_fwd_v1(q, k, v, scale)
    return y.reshape(B, C3 // 3, H, W), (q, k, v, a, scale, qkv.shape)


def spatial_attention_backward_v1(dy, cache):
    q, k, v, a, scale, shape = cache
    dy = np.ascontiguousarray(dy, dtype=q.dtype).reshape(q.shape)
    dq, dk, dv = _attn_bwd_v1(dy, q, k, v, a, scale)
    return np.stack([dq, dk, dv], axis=1).reshape(shape)


# --- version 2: channel-major, one parallel task per (sample, head), BLAS products ------------
# Head h of sample b reads its q, k, v as (d, N) matrices inside the (3C, B, N) buffer X
# (leading dimension B N, offsets below), so every product is one single-threaded BLAS call
# (_blas.gemm_t) on the buffers themselves: no gather, no copy.
@njit(parallel=True, **_JIT)
def _attn_fwd_v2(X, heads, scale, Y, A):
    C3, B, N = X.shape                  # X (3C, B, N): q rows [0, C), k [C, 2C), v [2C, 3C)
    C = C3 // 3
    d = C // heads
    ld = B * N
    Xf, Yf, Af = X.reshape(-1), Y.reshape(-1), A.reshape(-1)
    for bh in prange(B * heads):
        b, h = bh // heads, bh % heads
        qo, ko, vo, ao = (h * d) * ld + b * N, (C + h * d) * ld + b * N, (2 * C + h * d) * ld + b * N, bh * N * N
        gemm_t(N, N, d, Xf, qo, ld, True, Xf, ko, ld, False, Af, ao, N, 0.0)          # S = q^T k
        s = A[bh]
        rnd = np.empty(1, X.dtype)      # storing here rounds a float64 sum to the dtype
        for n in range(N):              # A = softmax(S scale), row by row, in place
            row = s[n]
            mx = row[0] * scale
            for m in range(N):
                row[m] = row[m] * scale
                mx = max(mx, row[m])
            tot = 0.0
            for m in range(N):
                e = math.exp(row[m] - mx)
                row[m] = e
                tot += e
            rnd[0] = tot                # the reference divides by the sum in the dtype
            for m in range(N):
                row[m] = row[m] / rnd[0]
        gemm_t(d, N, N, Xf, vo, ld, False, Af, ao, N, True, Yf, (h * d) * ld + b * N, ld, 0.0)   # y = v A^T


@njit(parallel=True, **_JIT)
def _attn_bwd_v2(dY, X, A, heads, scale, dX):
    C3, B, N = X.shape
    C = C3 // 3
    d = C // heads
    ld = B * N
    Xf, dYf, Af, dXf = X.reshape(-1), dY.reshape(-1), A.reshape(-1), dX.reshape(-1)
    for bh in prange(B * heads):
        b, h = bh // heads, bh % heads
        qo, ko, vo, ao = (h * d) * ld + b * N, (C + h * d) * ld + b * N, (2 * C + h * d) * ld + b * N, bh * N * N
        yo = (h * d) * ld + b * N
        gemm_t(d, N, N, dYf, yo, ld, False, Af, ao, N, False, dXf, vo, ld, 0.0)         # dv = dy A
        ds = np.empty((N, N), X.dtype)
        dsf = ds.reshape(-1)
        gemm_t(N, N, d, dYf, yo, ld, True, Xf, vo, ld, False, dsf, 0, N, 0.0)           # dA = dy^T v
        a = A[bh]
        rnd = np.empty(1, X.dtype)
        for n in range(N):              # dS = A (dA - rowsum(dA A)), in place
            r = 0.0
            for m in range(N):
                r += ds[n, m] * a[n, m]
            rnd[0] = r
            for m in range(N):
                ds[n, m] = a[n, m] * (ds[n, m] - rnd[0])
        gemm_t(d, N, N, Xf, ko, ld, False, dsf, 0, N, True, dXf, qo, ld, 0.0)           # dq = k dS^T
        gemm_t(d, N, N, Xf, qo, ld, False, dsf, 0, N, False, dXf, ko, ld, 0.0)          # dk = q dS
        for c in range(d):              # both times 1/sqrt(d), after the product as the reference
            for n in range(N):
                dXf[qo + c * ld + n] = dXf[qo + c * ld + n] * scale
                dXf[ko + c * ld + n] = dXf[ko + c * ld + n] * scale


def spatial_attention_forward_v2(qkv, heads=1):
    _check_heads(qkv, heads)
    X = cm(qkv)                                     # (3C, B, H, W), a view for a conv's output
    C3, B, H, W = X.shape
    N = H * W
    scale = X.dtype.type(1.0 / math.sqrt(C3 // 3 // heads))
    Y = np.empty((C3 // 3, B, H, W), X.dtype)
    A = np.empty((B * heads, N, N), X.dtype)
    _attn_fwd_v2(X.reshape(C3, B, N), heads, scale, Y.reshape(-1, B, N), A)
    return nchw(Y), (X, A, heads, scale)


def spatial_attention_backward_v2(dy, cache):
    X, A, heads, scale = cache
    C3, B = X.shape[:2]
    N = A.shape[1]
    dY = cm(dy, X.dtype)
    dX = np.empty_like(X)
    _attn_bwd_v2(dY.reshape(-1, B, N), X.reshape(C3, B, N), A, heads, scale, dX.reshape(C3, B, N))
    return nchw(dX)


# ================================ upsample_nearest2x ===========================================
def _check4(x):
    if np.ndim(x) != 4:
        raise ValueError(f"upsample_nearest2x: x must have shape (B, C, H, W); got {tuple(np.shape(x))}")


@njit(**_JIT)
def _up_fwd_v1(x):
    B, C, H, W = x.shape
    y = np.empty((B, C, 2 * H, 2 * W), x.dtype)
    for b in range(B):
        for c in range(C):
            for i in range(2 * H):
                for j in range(2 * W):
                    y[b, c, i, j] = x[b, c, i // 2, j // 2]
    return y


@njit(**_JIT)
def _up_bwd_v1(dy):
    B, C, H2, W2 = dy.shape
    dx = np.zeros((B, C, H2 // 2, W2 // 2), dy.dtype)
    for b in range(B):
        for c in range(C):
            for i in range(H2):
                for j in range(W2):
                    dx[b, c, i // 2, j // 2] += dy[b, c, i, j]
    return dx


def upsample_nearest2x_forward_v1(x):
    _check4(x)
    x = np.ascontiguousarray(x)
    return _up_fwd_v1(x), x.shape


def upsample_nearest2x_backward_v1(dy, cache):
    dy = np.ascontiguousarray(dy)
    return _up_bwd_v1(dy.reshape(cache[0], cache[1], 2 * cache[2], 2 * cache[3]))


@njit(parallel=True, **_JIT)
def _up_fwd_v2(x, y):                   # x (P, H, W) planes -> y (P, 2H, 2W)
    P, H, W = x.shape
    for p in prange(P):
        for i in range(H):
            for j in range(W):
                v = x[p, i, j]
                y[p, 2 * i, 2 * j] = v
                y[p, 2 * i, 2 * j + 1] = v
                y[p, 2 * i + 1, 2 * j] = v
                y[p, 2 * i + 1, 2 * j + 1] = v


@njit(parallel=True, **_JIT)
def _up_bwd_v2(dy, dx):
    P, H, W = dx.shape
    for p in prange(P):
        for i in range(H):
            for j in range(W):
                dx[p, i, j] = ((dy[p, 2 * i, 2 * j] + dy[p, 2 * i, 2 * j + 1])
                               + (dy[p, 2 * i + 1, 2 * j] + dy[p, 2 * i + 1, 2 * j + 1]))


def upsample_nearest2x_forward_v2(x):
    _check4(x)
    xc = cm(x)                          # (C, B, H, W)
    C, B, H, W = xc.shape
    y = np.empty((C, B, 2 * H, 2 * W), xc.dtype)
    _up_fwd_v2(xc.reshape(C * B, H, W), y.reshape(C * B, 2 * H, 2 * W))
    return nchw(y), xc.swapaxes(0, 1).shape


def upsample_nearest2x_backward_v2(dy, cache):
    B, C, H, W = cache
    dyc = cm(dy)
    dx = np.empty((C, B, H, W), dyc.dtype)
    _up_bwd_v2(dyc.reshape(C * B, 2 * H, 2 * W), dx.reshape(C * B, H, W))
    return nchw(dx)


# ================================ dropout =======================================================
@njit(**_JIT)
def _mul_v1(x, m):
    y = np.empty_like(x)
    for i in range(x.size):
        y[i] = x[i] * m[i]
    return y


def dropout_forward_v1(x, p, rng):
    """The reference's draw and mask; the product by a serial loop."""
    u = _dropout_uniforms(np.shape(x), p, rng)
    if u is None:
        return x, None
    x = np.ascontiguousarray(x)
    mask = ((u >= p) / (1.0 - p)).astype(x.dtype)
    return _mul_v1(x.reshape(-1), mask.reshape(-1)).reshape(x.shape), mask


def dropout_backward_v1(dy, cache):
    if cache is None:
        return dy
    dy = np.ascontiguousarray(dy, dtype=cache.dtype)
    return _mul_v1(dy.reshape(-1), cache.reshape(-1)).reshape(cache.shape)


def _planes3(x):
    """x as a C-contiguous (P, Q, S) buffer in x's memory order, whether (P, Q) is (B, C)
    (NCHW: trans False) or (C, B) (a channel-major view: trans True), and the function that
    turns a new buffer of that shape back into an array shaped and laid out like x."""
    x = np.asarray(x)
    shape = x.shape if x.ndim >= 2 else (1,) * (2 - x.ndim) + x.shape
    S = int(np.prod(shape[2:], dtype=np.int64))
    if x.ndim >= 3 and not x.flags.c_contiguous and x.swapaxes(0, 1).flags.c_contiguous:
        t = x.swapaxes(0, 1)
        return t.reshape(shape[1], shape[0], S), True, lambda buf: buf.reshape(t.shape).swapaxes(0, 1)
    return np.ascontiguousarray(x).reshape(shape[0], shape[1], S), False, lambda buf: buf.reshape(x.shape)


@njit(parallel=True, **_JIT)
def _dropout_fwd_v2(xb, u, trans, p, scale, zero, yb, keep):
    P, Q, S = xb.shape                  # xb, yb, keep in x's memory order; u (B, C, S) C order
    for pq in prange(P * Q):
        i, j = pq // Q, pq % Q
        b, c = (j, i) if trans else (i, j)
        for s in range(S):
            kk = u[b, c, s] >= p
            keep[i, j, s] = kk
            yb[i, j, s] = xb[i, j, s] * (scale if kk else zero)


@njit(parallel=True, **_JIT)
def _dropout_bwd_v2(dyb, keep, scale, zero, dxb):
    n = dyb.size
    dyf, kf, dxf = dyb.reshape(-1), keep.reshape(-1), dxb.reshape(-1)
    for i in prange(n):
        dxf[i] = dyf[i] * (scale if kf[i] else zero)


def dropout_forward_v2(x, p, rng):
    u = _dropout_uniforms(np.shape(x), p, rng)      # the reference's checks and draw, in its order
    if u is None:
        return x, None
    xb, trans, back = _planes3(x)
    B, C = (xb.shape[1], xb.shape[0]) if trans else xb.shape[:2]
    t = xb.dtype.type
    scale, zero = t(1.0 / (1.0 - p)), t(0)       # the reference's mask values keep/(1-p) in the dtype
    yb, keep = np.empty_like(xb), np.empty(xb.shape, np.bool_)
    _dropout_fwd_v2(xb, u.reshape(B, C, -1), trans, float(p), scale, zero, yb, keep)
    return back(yb), (keep, trans, scale, back)


def dropout_backward_v2(dy, cache):
    if cache is None:
        return dy
    keep, trans, scale, back = cache
    dy = np.asarray(dy, dtype=scale.dtype)
    dyb = np.ascontiguousarray(dy.swapaxes(0, 1) if trans else dy).reshape(keep.shape)
    dxb = np.empty(keep.shape, scale.dtype)
    _dropout_bwd_v2(dyb, keep, scale, scale.dtype.type(0), dxb)
    return back(dxb)


KERNELS = {
    "spatial_attention": {1: (spatial_attention_forward_v1, spatial_attention_backward_v1),
                          2: (spatial_attention_forward_v2, spatial_attention_backward_v2)},
    "upsample_nearest2x": {1: (upsample_nearest2x_forward_v1, upsample_nearest2x_backward_v1),
                           2: (upsample_nearest2x_forward_v2, upsample_nearest2x_backward_v2)},
    "dropout": {1: (dropout_forward_v1, dropout_backward_v1), 2: (dropout_forward_v2, dropout_backward_v2)},
}
