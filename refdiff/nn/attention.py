"""The ops of the modern diffusion UNet (refdiff.nn.unet_ddpm) that the report's network does
not need: spatial self-attention, nearest-neighbour 2x upsampling and dropout (reference).

Pairs as everywhere in refdiff.nn: `<op>_forward(...) -> (y, cache)`, `<op>_backward(dy,
cache) -> dx`. They take their array module from their input (numpy or cupy).

spatial_attention (multi-head self-attention over the H W positions of a feature map; the
AttnBlock of Ho et al. 2020, appendix B, after Vaswani et al. 2017, eq. 1):

    qkv (B, 3C, H, W), from a 1x1 convolution: channels [0, C) are the queries, [C, 2C) the
    keys, [2C, 3C) the values. With `heads` heads, d = C / heads, N = H W, head h owns the
    channels [h d, (h + 1) d) of each of q, k, v, seen as (d, N) matrices:

        S_h = q_h^T k_h / sqrt(d)                    (N, N)  query position n, key position m
        A_h = softmax(S_h) over m (each row sums to 1)
        y_h = v_h A_h^T                              (d, N)  y_h[:, n] = sum_m A_h[n, m] v_h[:, m]

    y (B, C, H, W) holds y_h in the channels of head h. Backward, with dy_h (d, N):

        dv_h = dy_h A_h,   dA_h = dy_h^T v_h,
        dS_h = A_h * (dA_h - rowsum(dA_h * A_h))      (the softmax's Jacobian, row by row)
        dq_h = k_h dS_h^T / sqrt(d),   dk_h = q_h dS_h / sqrt(d)

`spatial_attention_naive_forward` is the literal definition, one query position at a time with
its own max-shifted softmax (NumPy only): the test oracle of spatial_attention_forward.

upsample_nearest2x: y[b, c, 2i + a, 2j + e] = x[b, c, i, j] for a, e in {0, 1}; backward
sums each 2 x 2 block of dy.

dropout (Srivastava et al. 2014, "inverted" scaling): y = x * m / (1 - p) with m ~ Bernoulli(1
- p) entrywise, drawn on the host as `rng.random(x.shape) >= p` (float64 uniforms, C order), so
a seed gives the same mask on every backend; p = 0 draws nothing and returns x. Backward: dy
times the same scaled mask. Models apply it only when training (an rng is given).

Shape glossary: B batch, C channels, H, W spatial, N = H W positions, d channels per head.
"""
from __future__ import annotations

import math

import numpy as np

from .array_module import array_module

__all__ = ["spatial_attention_forward", "spatial_attention_backward", "spatial_attention_naive_forward",
           "upsample_nearest2x_forward", "upsample_nearest2x_backward",
           "dropout_forward", "dropout_backward"]


def _check_heads(qkv, heads):
    if isinstance(heads, bool) or not isinstance(heads, (int, np.integer)) or heads < 1:
        raise ValueError(f"spatial_attention: heads must be an integer >= 1; got {heads!r}")
    if qkv.ndim != 4 or qkv.shape[1] % 3 != 0:
        raise ValueError(f"spatial_attention: qkv must have shape (B, 3C, H, W); got {tuple(qkv.shape)}")
    C = qkv.shape[1] // 3
    if C % heads != 0:
        raise ValueError(f"spatial_attention: heads={heads} must divide the C={C} channels of each of q, k, v")


def _softmax_last(s):
    xp = array_module(s)
    e = xp.exp(s - s.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def spatial_attention_forward(qkv, heads=1):
    """qkv (B, 3C, H, W) -> y (B, C, H, W): softmax(q^T k / sqrt(d)) attention per head."""
    _check_heads(qkv, heads)
    B, C3, H, W = qkv.shape
    C, N = C3 // 3, H * W
    d = C // heads
    parts = qkv.reshape(B, 3, heads, d, N)
    q, k, v = parts[:, 0], parts[:, 1], parts[:, 2]                    # (B, heads, d, N) each
    scale = qkv.dtype.type(1.0 / math.sqrt(d))
    a = _softmax_last((q.transpose(0, 1, 3, 2) @ k) * scale)          # (B, heads, N, N)
    y = v @ a.transpose(0, 1, 3, 2)                                   # (B, heads, d, N)
    return y.reshape(B, C, H, W), (q, k, v, a, scale, qkv.shape)


def spatial_attention_backward(dy, cache):
    """dy (B, C, H, W) -> dqkv (B, 3C, H, W)."""
    q, k, v, a, scale, shape = cache
    xp = array_module(dy)
    B, heads, d, N = q.shape
    dy = xp.asarray(dy, dtype=q.dtype).reshape(B, heads, d, N)
    dv = dy @ a
    da = dy.transpose(0, 1, 3, 2) @ v                                 # (B, heads, N, N)
    ds = a * (da - (da * a).sum(axis=-1, keepdims=True))
    dq = (k @ ds.transpose(0, 1, 3, 2)) * scale
    dk = (q @ ds) * scale
    return xp.stack([dq, dk, dv], axis=1).reshape(shape)


def spatial_attention_naive_forward(qkv, heads=1):
    """Literal definition, one (sample, head, query position n) at a time:

        s_m = sum_c q[c, n] k[c, m] / sqrt(d),   a_m = exp(s_m - max s) / sum exp(s - max s),
        y[:, n] = sum_m a_m v[:, m].

    The test oracle for spatial_attention_forward (NumPy). Returns (y, None): no naive backward.
    """
    _check_heads(qkv, heads)
    B, C3, H, W = qkv.shape
    C, N = C3 // 3, H * W
    d = C // heads
    flat = np.asarray(qkv).reshape(B, 3, C, N)
    y = np.zeros((B, C, N), dtype=qkv.dtype)
    for b in range(B):
        for h in range(heads):
            ch = slice(h * d, (h + 1) * d)
            q, k, v = flat[b, 0, ch], flat[b, 1, ch], flat[b, 2, ch]      # (d, N) each
            for n in range(N):
                s = np.array([np.dot(q[:, n], k[:, m]) for m in range(N)]) / math.sqrt(d)
                e = np.exp(s - s.max())
                a = e / e.sum()
                y[b, ch, n] = sum(a[m] * v[:, m] for m in range(N))
    return y.reshape(B, C, H, W), None


def upsample_nearest2x_forward(x):
    """x (B, C, H, W) -> y (B, C, 2H, 2W), every pixel repeated into a 2 x 2 block."""
    if x.ndim != 4:
        raise ValueError(f"upsample_nearest2x: x must have shape (B, C, H, W); got {tuple(x.shape)}")
    return x.repeat(2, axis=2).repeat(2, axis=3), x.shape


def upsample_nearest2x_backward(dy, cache):
    """dy (B, C, 2H, 2W) -> dx (B, C, H, W): the sum over each 2 x 2 block."""
    B, C, H, W = cache
    return dy.reshape(B, C, H, 2, W, 2).sum(axis=(3, 5))


def _dropout_uniforms(shape, p, rng):
    """dropout's checks and its host draw, the one copy every backend's twin calls: None when
    p = 0 (nothing drawn), else rng.random(shape) (float64 uniforms, C order); entry kept
    where u >= p."""
    if isinstance(p, bool) or not isinstance(p, (int, float, np.floating)) or not 0 <= p < 1:
        raise ValueError(f"dropout: p must be a number in [0, 1); got {p!r}")
    if p == 0:
        return None
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"dropout: rng must be a numpy.random.Generator; got {type(rng).__name__}")
    return rng.random(tuple(shape))


def dropout_forward(x, p, rng):
    """y = x * mask / (1 - p), mask = rng.random(x.shape) >= p (host draw); p in [0, 1)."""
    u = _dropout_uniforms(x.shape, p, rng)
    if u is None:
        return x, None
    mask = array_module(x).asarray(((u >= p) / (1.0 - p)).astype(x.dtype))
    return x * mask, mask


def dropout_backward(dy, cache):
    """dy -> dx = dy * mask / (1 - p) (dy itself when p was 0)."""
    return dy if cache is None else dy * cache
