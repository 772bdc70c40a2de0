"""@cuda.jit twins of refdiff/nn/attention.py: spatial_attention, upsample_nearest2x, dropout.

Version 1 only, literal ports (formulas, shapes and citations: refdiff/nn/attention.py), one
thread per output entry or per row, the reference's order of operations, sums in the dtype
(zero passed as a scalar of the dtype), as the other ops of this backend (functional.py):

  spatial_attention  qkv (B, 3C, N) flat; forward: one thread per (sample, head, query n)
      computes the row S[n, :] = q[:, n]^T k / sqrt(d) into A, its softmax in place, then one
      thread per (sample, head, channel, n) y = sum_m A[n, m] v[:, m]. Backward: dv one
      thread per (b, h, c, m); one thread per (b, h, n) the row dA[n, :] = dy[:, n]^T v and
      dS[n, :] = A (dA - rowsum(dA A)); dq, dk one thread per (b, h, c, j).
  upsample_nearest2x  one thread per output pixel; backward one per input pixel, adding its
      2 x 2 block as (top-left + top-right) + (bottom-left + bottom-right).
  dropout  the mask drawn on the host exactly as the reference draws it (same seed, same
      mask on every backend), uploaded once; one thread per entry multiplies.
Checked against the reference by tests/test_backend_ops.py (under NUMBA_ENABLE_CUDASIM=1 on
the CPU: tests/test_backend_numba_cuda_sim.py).
"""
from __future__ import annotations

import math

import numpy as np
from numba import cuda

from refdiff.nn.attention import _check_heads, _dropout_uniforms

from .functional import flat, launch


def _t(dtype, v):
    return np.dtype(dtype).type(v)


# --- spatial_attention -----------------------------------------------------------------------------------
@cuda.jit
def _attn_rows(qkv, a, B, heads, d, N, scale, zero):
    i = cuda.grid(1)                                   # (b, h, n)
    if i < B * heads * N:
        bh, n = i // N, i % N
        b, h = bh // heads, bh % heads
        C = heads * d
        q0, k0 = (b * 3 * C + h * d) * N, (b * 3 * C + C + h * d) * N
        r = (bh * N + n) * N
        for m in range(N):                             # S = (q^T k) scale
            acc = zero
            for c in range(d):
                acc += qkv[q0 + c * N + n] * qkv[k0 + c * N + m]
            a[r + m] = acc * scale
        mx = a[r]
        for m in range(N):
            mx = max(mx, a[r + m])
        tot = zero
        for m in range(N):
            e = math.exp(a[r + m] - mx)
            a[r + m] = e
            tot += e
        for m in range(N):
            a[r + m] = a[r + m] / tot


@cuda.jit
def _attn_out(qkv, a, y, B, heads, d, N, zero):
    i = cuda.grid(1)                                   # (b, h, c, n) = y's flat index
    if i < B * heads * d * N:
        n, bhc = i % N, i // N
        c, bh = bhc % d, bhc // d
        b, h = bh // heads, bh % heads
        C = heads * d
        v0 = (b * 3 * C + 2 * C + h * d + c) * N
        r = (bh * N + n) * N
        acc = zero
        for m in range(N):
            acc += qkv[v0 + m] * a[r + m]
        y[i] = acc


@cuda.jit
def _attn_dv(dy, a, dqkv, B, heads, d, N, zero):
    i = cuda.grid(1)                                   # (b, h, c, m): dv = dy A
    if i < B * heads * d * N:
        m, bhc = i % N, i // N
        c, bh = bhc % d, bhc // d
        b, h = bh // heads, bh % heads
        C = heads * d
        acc = zero
        for n in range(N):
            acc += dy[(b * C + h * d + c) * N + n] * a[(bh * N + n) * N + m]
        dqkv[(b * 3 * C + 2 * C + h * d + c) * N + m] = acc


@cuda.jit
def _attn_ds(dy, qkv, a, ds, B, heads, d, N, zero):
    i = cuda.grid(1)                                   # (b, h, n): the row dS[n, :]
    if i < B * heads * N:
        bh, n = i // N, i % N
        b, h = bh // heads, bh % heads
        C = heads * d
        r = (bh * N + n) * N
        for m in range(N):                             # dA = dy^T v
            acc = zero
            for c in range(d):
                acc += dy[(b * C + h * d + c) * N + n] * qkv[(b * 3 * C + 2 * C + h * d + c) * N + m]
            ds[r + m] = acc
        s = zero
        for m in range(N):
            s += ds[r + m] * a[r + m]
        for m in range(N):
            ds[r + m] = a[r + m] * (ds[r + m] - s)


@cuda.jit
def _attn_dqk(qkv, ds, dqkv, B, heads, d, N, scale, zero):
    i = cuda.grid(1)                                   # (b, h, c, j)
    if i < B * heads * d * N:
        j, bhc = i % N, i // N
        c, bh = bhc % d, bhc // d
        b, h = bh // heads, bh % heads
        C = heads * d
        q0, k0 = (b * 3 * C + h * d + c) * N, (b * 3 * C + C + h * d + c) * N
        aq, ak = zero, zero
        for m in range(N):
            aq += qkv[k0 + m] * ds[(bh * N + j) * N + m]      # dq = k dS^T
            ak += qkv[q0 + m] * ds[(bh * N + m) * N + j]      # dk = q dS
        dqkv[q0 + j] = aq * scale
        dqkv[k0 + j] = ak * scale


def spatial_attention_forward(A, qkv, heads=1):
    _check_heads(qkv, heads)
    qd = A.dev(qkv)
    dt = np.dtype(qd.dtype)
    B, C3, H, W = qd.shape
    N, d = H * W, C3 // 3 // heads
    scale = _t(dt, 1.0 / math.sqrt(d))
    a = A.empty((B, heads, N, N), dt)
    y = A.empty((B, C3 // 3, H, W), dt)
    launch(_attn_rows, B * heads * N, flat(qd), flat(a), B, heads, d, N, scale, _t(dt, 0))
    launch(_attn_out, y.size, flat(qd), flat(a), flat(y), B, heads, d, N, _t(dt, 0))
    return A.out(y), (qd, a, heads, scale)


def spatial_attention_backward(A, dy, cache):
    qd, a, heads, scale = cache
    dt = np.dtype(qd.dtype)
    B, C3, H, W = qd.shape
    N, d = H * W, C3 // 3 // heads
    dyd = A.dev(dy, dt)
    dqkv, ds = A.empty(qd.shape, dt), A.empty(a.shape, dt)
    zero = _t(dt, 0)
    launch(_attn_dv, B * heads * d * N, flat(dyd), flat(a), flat(dqkv), B, heads, d, N, zero)
    launch(_attn_ds, B * heads * N, flat(dyd), flat(qd), flat(a), flat(ds), B, heads, d, N, zero)
    launch(_attn_dqk, B * heads * d * N, flat(qd), flat(ds), flat(dqkv), B, heads, d, N, scale, zero)
    return A.out(dqkv)


# --- upsample_nearest2x -------------------------------------------------------------------------------------
@cuda.jit
def _up_fwd(x, y, H, W, n):
    i = cuda.grid(1)                                   # y's flat index (plane, r, q) in (B C, 2H, 2W)
    if i < n:
        q, rest = i % (2 * W), i // (2 * W)
        r, p = rest % (2 * H), rest // (2 * H)
        y[i] = x[(p * H + r // 2) * W + q // 2]


@cuda.jit
def _up_bwd(dy, dx, H, W, n):
    i = cuda.grid(1)                                   # dx's flat index (plane, r, q) in (B C, H, W)
    if i < n:
        q, rest = i % W, i // W
        r, p = rest % H, rest // H
        t = (p * 2 * H + 2 * r) * 2 * W + 2 * q        # top-left of the block in dy
        dx[i] = (dy[t] + dy[t + 1]) + (dy[t + 2 * W] + dy[t + 2 * W + 1])


def upsample_nearest2x_forward(A, x):
    if len(x.shape) != 4:
        raise ValueError(f"upsample_nearest2x: x must have shape (B, C, H, W); got {tuple(x.shape)}")
    xd = A.dev(x)
    B, C, H, W = xd.shape
    y = A.empty((B, C, 2 * H, 2 * W), xd.dtype)
    launch(_up_fwd, y.size, flat(xd), flat(y), H, W, y.size)
    return A.out(y), tuple(xd.shape)


def upsample_nearest2x_backward(A, dy, cache):
    B, C, H, W = cache
    dyd = A.dev(dy)
    dx = A.empty((B, C, H, W), dyd.dtype)
    launch(_up_bwd, dx.size, flat(dyd), flat(dx), H, W, dx.size)
    return A.out(dx)


# --- dropout --------------------------------------------------------------------------------------------
@cuda.jit
def _mul(x, m, y, n):
    i = cuda.grid(1)
    if i < n:
        y[i] = x[i] * m[i]


def dropout_forward(A, x, p, rng):
    """The reference's checks (in its order) and host draw (refdiff.nn.attention.dropout_forward),
    the product on the device."""
    u = _dropout_uniforms(np.shape(x), p, rng)
    if u is None:
        return x, None
    xd = A.dev(x)
    md = A.dev(((u >= p) / (1.0 - p)).astype(xd.dtype))
    y = A.empty(xd.shape, xd.dtype)
    launch(_mul, xd.size, flat(xd), flat(md), flat(y), xd.size)
    return A.out(y), md


def dropout_backward(A, dy, cache):
    if cache is None:
        return dy
    dyd = A.dev(dy, cache.dtype)
    dx = A.empty(cache.shape, cache.dtype)
    launch(_mul, dyd.size, flat(dyd), flat(cache), flat(dx), dyd.size)
    return A.out(dx)


KERNELS = {
    "spatial_attention": {1: (spatial_attention_forward, spatial_attention_backward)},
    "upsample_nearest2x": {1: (upsample_nearest2x_forward, upsample_nearest2x_backward)},
    "dropout": {1: (dropout_forward, dropout_backward)},
}
