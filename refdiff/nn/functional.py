"""Neural-network ops as pure forward/backward pairs (reference, float32 or float64).

Every op is a pair

    <op>_forward(inputs..., hyper-params...) -> (y, cache)
    <op>_backward(dy, cache) -> gradients, in the order of the forward's array inputs

with no hidden state: `cache` holds exactly what the backward needs. Weight layouts are
PyTorch's (a linear weight is (out, in), a conv weight (Cout, Cin, kH, kW)), so a PyTorch
state dict ports one to one. Ops keep the dtype of their input.

This module is the specification: every backend in `refdiff_cuda` carries the same op
names and signatures and is tested against these functions. The ops take their array
module from their inputs (`array_module(x)`: numpy, or cupy for CuPy arrays), so the same
functions are the `cupy` backend's version 1.

Shape glossary: B batch, C channels, H, W spatial, D features, E embedding dimension.
"""
from __future__ import annotations

import numpy as np

from .conv import *  # noqa: F401,F403  conv2d, conv_transpose2d, max_pool2d (+ naive twins)
from .norm import *  # noqa: F401,F403  group_norm
from .lossfn import *  # noqa: F401,F403  cross-entropy, binary cross-entropy
from .steps import *  # noqa: F401,F403  ddpm_step, em_step (the samplers' updates)
from .attention import *  # noqa: F401,F403  spatial_attention, upsample_nearest2x, dropout
from .array_module import array_module


# --- linear -----------------------------------------------------------------------------
def linear_forward(x, w, b):
    """y = x w^T + b.  x (B, Din), w (Dout, Din), b (Dout,) or None -> y (B, Dout)."""
    y = x @ w.T
    if b is not None:
        y = y + b
    return y, (x, w, b is not None)


def linear_backward(dy, cache):
    """dy (B, Dout) -> dx (B, Din), dw (Dout, Din), db (Dout,) or None."""
    x, w, has_b = cache
    dx = dy @ w
    dw = dy.T @ x
    db = dy.sum(axis=0) if has_b else None
    return dx, dw, db


# --- activations --------------------------------------------------------------------------
def _sigmoid(x):
    # sigmoid(x) = (1 + tanh(x/2)) / 2: one transcendental, no overflow for any x. In place
    # on one new array (the same operations as the formula, so the same bits).
    s = array_module(x).tanh(0.5 * x)
    s += 1
    s *= 0.5
    return s


def sigmoid_forward(x):
    y = _sigmoid(x)
    return y, y


def sigmoid_backward(dy, cache):
    y = cache
    return dy * y * (1 - y)


def silu_forward(x):
    """SiLU(x) = x sigmoid(x) (a.k.a. swish)."""
    s = _sigmoid(x)
    return x * s, (x, s)


def silu_backward(dy, cache):
    # d/dx [x s(x)] = s + x s (1 - s) = s (1 + x (1 - s)), built in place on one array
    x, s = cache
    g = 1 - s
    g *= x
    g += 1
    g *= s
    return dy * g


def relu_forward(x):
    return array_module(x).maximum(x, 0), x > 0


def relu_backward(dy, cache):
    return dy * cache


def leaky_relu_forward(x, slope=0.2):
    mask = x > 0
    return array_module(x).where(mask, x, slope * x), (mask, slope)


def leaky_relu_backward(dy, cache):
    mask, slope = cache
    return array_module(dy).where(mask, dy, slope * dy)


def tanh_forward(x):
    y = array_module(x).tanh(x)
    return y, y


def tanh_backward(dy, cache):
    return dy * (1 - cache * cache)


# --- shape ops ----------------------------------------------------------------------------
def concat_forward(xs, axis=1):
    """Concatenate arrays along `axis` (channels by default, as the UNet skips do)."""
    sizes = [x.shape[axis] for x in xs]
    return array_module(*xs).concatenate(xs, axis=axis), (sizes, axis)


def concat_backward(dy, cache):
    """-> list of gradients, one per input."""
    sizes, axis = cache
    return array_module(dy).split(dy, np.cumsum(sizes)[:-1].tolist(), axis=axis)


def add_channel_bias_forward(x, v):
    """y[b, c, ...] = x[b, c, ...] + v[b, c]: add a per-sample, per-channel vector.

    This is how the time embedding enters the UNet (constant over H, W) and the MLP.
    x (B, C, ...), v (B, C).
    """
    return x + v.reshape(v.shape + (1,) * (x.ndim - 2)), x.ndim


def add_channel_bias_backward(dy, cache):
    ndim = cache
    return dy, dy.sum(axis=tuple(range(2, ndim))) if ndim > 2 else dy


# --- time embedding -------------------------------------------------------------------------
def time_embedding(t, dim, base=10000.0, dtype=np.float32):
    """Sinusoidal embedding of the report's appendix (Vaswani et al. 2017), no parameters.

    P[t, 2i] = sin(t / base^(2i/d)),  P[t, 2i+1] = cos(t / base^(2i/d)).
    t (B,) float or int -> (B, dim). An odd `dim` ends with one extra sine column.
    The forward has no backward: t is an input, never a trained quantity.
    """
    t = np.asarray(t, dtype=np.float64).reshape(-1)
    # Samplers call this with one t for the whole batch: embed each distinct t once.
    tu, inv = np.unique(t, return_inverse=True)
    k = np.arange(dim)
    freq = base ** (-(k - k % 2) / dim)          # 1 / base^(2i/d) for columns 2i and 2i+1
    angle = tu[:, None] * freq[None, :]
    emb = np.where(k % 2 == 0, np.sin(angle), np.cos(angle))
    return emb.astype(dtype)[inv.reshape(-1)]


# --- losses ---------------------------------------------------------------------------------
def mse_forward(pred, target, weight=None):
    """mean over the batch of weight_b * sum over features of (pred - target)^2.

    pred, target (B, ...); weight (B,) or None. Returns a Python float and the cache.
    """
    xp = array_module(pred, target)
    diff = pred - target
    per = xp.sum(diff.reshape(diff.shape[0], -1) ** 2, axis=1)
    w = xp.ones_like(per) if weight is None else xp.asarray(weight, dtype=per.dtype)
    return float(xp.mean(w * per)), (diff, w)


def mse_backward(cache):
    """-> d loss / d pred."""
    diff, w = cache
    scale = (2.0 / diff.shape[0]) * w
    return diff * scale.reshape((-1,) + (1,) * (diff.ndim - 1)).astype(diff.dtype)


# --- optimiser update -------------------------------------------------------------------------
def adam_update(p, g, m, v, lr, beta1, beta2, eps, step, weight_decay=0.0):
    """One AdamW step in place (Kingma & Ba 2015, Alg. 1; Loshchilov & Hutter 2019).

    m <- b1 m + (1-b1) g;  v <- b2 v + (1-b2) g^2;
    p <- p - lr wd p - lr (m / (1-b1^step)) / (sqrt(v / (1-b2^step)) + eps).
    `step` counts from 1. Same order of operations as torch.optim.AdamW.
    """
    if weight_decay:
        p *= 1 - lr * weight_decay
    m *= beta1
    m += (1 - beta1) * g
    v *= beta2
    v += (1 - beta2) * g * g
    bc1 = 1 - beta1 ** step
    bc2 = 1 - beta2 ** step
    denom = array_module(v).sqrt(v) / np.sqrt(bc2) + eps
    p -= (lr / bc1) * m / denom
