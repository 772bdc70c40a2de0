"""Normalisation ops as forward/backward pairs (reference, float32 or float64).

GroupNorm (Wu & He 2018), PyTorch semantics: x (B, C, *) is split into G groups of C/G
consecutive channels; each (sample, group) is normalised by its own mean and biased
variance over those channels and all spatial positions, then scaled and shifted per channel:

    xhat = (x - mu_bg) / sqrt(var_bg + eps),    y = gamma_c xhat + beta_c.

Backward, per (sample, group) with n entries and g = dy * gamma:

    dx = rstd (g - mean(g) - xhat mean(g xhat)),  dgamma = sum dy xhat,  dbeta = sum dy,

the sums running over batch and space. `group_norm_silu` is GroupNorm followed by SiLU,
composed from the two reference pairs; an accelerated backend fuses it and must agree.
"""
from __future__ import annotations

import numpy as np

from .array_module import array_module

__all__ = ["group_norm_forward", "group_norm_backward",
           "group_norm_silu_forward", "group_norm_silu_backward"]


def _check(x, num_groups, gamma, beta):
    if x.ndim < 2:
        raise ValueError(f"group_norm: x must be (B, C, ...); got shape {x.shape}")
    C = x.shape[1]
    if isinstance(num_groups, bool) or not isinstance(num_groups, (int, np.integer)) \
            or num_groups < 1 or C % num_groups:
        raise ValueError(f"group_norm: num_groups must be a positive divisor of C = {C}; got {num_groups!r}")
    for name, p in (("gamma", gamma), ("beta", beta)):
        if tuple(p.shape) != (C,):
            raise ValueError(f"group_norm: {name} must have shape ({C},); got {tuple(p.shape)}")


def group_norm_forward(x, num_groups, gamma, beta, eps=1e-5):
    """x (B, C, *), gamma (C,), beta (C,) -> y like x."""
    _check(x, num_groups, gamma, beta)
    B, C = x.shape[:2]
    bshape = (1, C) + (1,) * (x.ndim - 2)                     # broadcast a (C,) vector over x
    gamma = gamma.astype(x.dtype, copy=False).reshape(bshape)
    beta = beta.astype(x.dtype, copy=False).reshape(bshape)
    xg = x.reshape(B, num_groups, -1)                         # (B, G, C/G * spatial)
    xc = xg - xg.mean(axis=2, keepdims=True)
    rstd = 1 / array_module(x).sqrt((xc * xc).mean(axis=2, keepdims=True) + x.dtype.type(eps))  # (B, G, 1)
    xhat = (xc * rstd).reshape(x.shape)
    return xhat * gamma + beta, (xhat, rstd, gamma)


def group_norm_backward(dy, cache):
    """dy like x -> dx like x, dgamma (C,), dbeta (C,)."""
    xhat, rstd, gamma = cache
    B, C = xhat.shape[:2]
    G = rstd.shape[1]
    axes = (0,) + tuple(range(2, xhat.ndim))
    dy = array_module(dy).asarray(dy, dtype=xhat.dtype)
    dgamma = (dy * xhat).sum(axis=axes)
    dbeta = dy.sum(axis=axes)
    g = (dy * gamma).reshape(B, G, -1)
    xh = xhat.reshape(B, G, -1)
    dx = rstd * (g - g.mean(axis=2, keepdims=True) - xh * (g * xh).mean(axis=2, keepdims=True))
    return dx.reshape(xhat.shape), dgamma, dbeta


def group_norm_silu_forward(x, num_groups, gamma, beta, eps=1e-5):
    """SiLU(GroupNorm(x)). x (B, C, *) -> y like x."""
    from .functional import silu_forward  # here, not at the top: functional imports this module
    z, norm_cache = group_norm_forward(x, num_groups, gamma, beta, eps)
    y, act_cache = silu_forward(z)
    return y, (norm_cache, act_cache)


def group_norm_silu_backward(dy, cache):
    """dy like x -> dx, dgamma (C,), dbeta (C,)."""
    from .functional import silu_backward
    norm_cache, act_cache = cache
    return group_norm_backward(silu_backward(dy, act_cache), norm_cache)
