"""Normalisation ops as forward/backward pairs (reference, float32 or float64).

GroupNorm (Wu & He 2018), PyTorch semantics: x (B, C, *) is split into G groups of C/G
consecutive channels; each (sample, group) is normalised by its own mean and biased
variance over those channels and all spatial positions, then scaled and shifted per channel:

    xhat = (x - mu_bg) / sqrt(var_bg + eps),    y = gamma_c xhat + beta_c.

Backward, per (sample, group) with n entries and g = dy * gamma:

    dx = rstd (g - mean(g) - xhat mean(g xhat)),  dgamma = sum dy xhat,  dbeta = sum dy,

the sums running over batch and space. The backward takes its group means from two sums
per (sample, channel), S0 = sum_space dy and S1 = sum_space dy xhat:

    mean(g) = sum_{c in group} gamma_c S0 / n,   mean(g xhat) = sum_{c in group} gamma_c S1 / n,
    dx = (rstd gamma_c) dy - (rstd mean(g xhat)) xhat - rstd mean(g),
    dgamma = sum_b S1,   dbeta = sum_b S0,

so that only S0, S1 and dx pass over the (B, C, *) arrays. `group_norm_silu` is GroupNorm
followed by SiLU, composed from the two reference pairs; an accelerated backend fuses it
and must agree.
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


def _dot_last(a, b):
    """sum over the last axis of a * b: a stack of dot products (BLAS, no a * b temporary)."""
    return (a[..., None, :] @ b[..., :, None])[..., 0, 0]


def group_norm_forward(x, num_groups, gamma, beta, eps=1e-5):
    """x (B, C, *), gamma (C,), beta (C,) -> y like x."""
    _check(x, num_groups, gamma, beta)
    B, C = x.shape[:2]
    bshape = (1, C) + (1,) * (x.ndim - 2)                     # broadcast a (C,) vector over x
    gamma = gamma.astype(x.dtype, copy=False).reshape(bshape)
    beta = beta.astype(x.dtype, copy=False).reshape(bshape)
    xg = x.reshape(B, num_groups, -1)                         # (B, G, C/G * spatial)
    xhat = xg - xg.mean(axis=2, keepdims=True)                # x - mu; scaled to xhat in place below
    var = _dot_last(xhat, xhat)[..., None] / xhat.shape[2]   # two-pass variance (B, G, 1)
    rstd = 1 / array_module(x).sqrt(var + x.dtype.type(eps))
    xhat *= rstd
    xhat = xhat.reshape(x.shape)
    y = xhat * gamma
    y += beta
    return y, (xhat, rstd, gamma)


def group_norm_backward(dy, cache):
    """dy like x -> dx like x, dgamma (C,), dbeta (C,)."""
    xhat, rstd, gamma = cache
    B, C = xhat.shape[:2]
    G = rstd.shape[1]
    xp = array_module(dy)
    dy = xp.asarray(dy, dtype=xhat.dtype)
    dyc, xhc = dy.reshape(B, C, -1), xhat.reshape(B, C, -1)   # (B, C, spatial)
    s0, s1 = dyc.sum(axis=2), _dot_last(dyc, xhc)             # S0, S1 (B, C)
    gam, n = gamma.reshape(1, C), xhc.shape[2] * (C // G)     # n entries per (sample, group)
    r = rstd.reshape(B, G)
    per_channel = lambda v: xp.repeat(v, C // G, axis=1)[..., None]   # (B, G) -> (B, C, 1)
    mean_g = (s0 * gam).reshape(B, G, -1).sum(axis=2) / n             # mean(g), g = dy gamma
    mean_gx = (s1 * gam).reshape(B, G, -1).sum(axis=2) / n            # mean(g xhat)
    dx = dyc * (per_channel(r) * gam[..., None])                      # rstd gamma_c dy
    shift = xhc * per_channel(r * mean_gx)
    shift += per_channel(r * mean_g)
    dx -= shift
    return dx.reshape(xhat.shape), s1.sum(axis=0), s0.sum(axis=0)


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
