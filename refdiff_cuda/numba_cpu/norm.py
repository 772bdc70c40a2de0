"""Numba (CPU) twins of refdiff/nn/norm.py: group_norm and group_norm_silu.

Version 1 is a literal, serial port: per (sample, group) the mean, the centred values, the
biased variance, rstd = 1/sqrt(var + eps), xhat and y = xhat gamma + beta; the cache holds
(xhat, rstd, gamma) as the reference's; group_norm_silu composes it with SiLU v1.
Sums are accumulated in float64 (the reference sums pairwise in the input's dtype), then
rounded to the dtype where the reference holds a dtype value (mean, var, rstd).

Version 2 works on the channel-major buffer (C, B, S) (a group's channels are C/G
contiguous planes of S values for each sample), in parallel over (sample, group) pairs:
  forward  two reads of x (mean, then variance about the rounded mean: the reference's
           two-pass formula, no E[x^2] - E[x]^2 cancellation), one write of y; the cache
           keeps x, mean and rstd instead of xhat (xhat is recomputed: saves a write);
  backward one pass for the two group sums (and per-(sample, channel) partials of dgamma,
           dbeta, reduced over samples afterwards: no races, deterministic), one pass for dx.
group_norm_silu v2 fuses SiLU into both: z = xhat gamma + beta and sigmoid(z) are
recomputed, never stored.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from refdiff.nn.norm import _check

from ._layout import cm, nchw
from .functional import silu_backward_v1, silu_forward_v1

_JIT = dict(cache=True, fastmath=False)


# ================================ version 1: literal port ======================================
@njit(**_JIT)
def _gn_fwd_v1(x, gamma, beta, eps, one):
    B, G, n = x.shape                   # x (B, G, C/G * S); gamma, beta expanded to (G, n)
    xhat = np.empty_like(x)
    y = np.empty_like(x)
    rstd = np.empty((B, G, 1), x.dtype)
    rnd = np.empty(2, x.dtype)          # storing here rounds a float64 sum to x's dtype
    for b in range(B):
        for g in range(G):
            acc = 0.0
            for k in range(n):
                acc += x[b, g, k]
            rnd[0] = acc / n
            mu = rnd[0]
            acc = 0.0
            for k in range(n):
                d = x[b, g, k] - mu
                acc += d * d
            rnd[1] = acc / n
            r = one / math.sqrt(rnd[1] + eps)
            rstd[b, g, 0] = r
            for k in range(n):
                xh = (x[b, g, k] - mu) * r
                xhat[b, g, k] = xh
                y[b, g, k] = xh * gamma[g, k] + beta[g, k]
    return y, xhat, rstd


@njit(**_JIT)
def _gn_bwd_v1(dy, xhat, rstd, gamma):
    B, G, n = dy.shape
    dx = np.empty_like(dy)
    rnd = np.empty(2, dy.dtype)
    for b in range(B):
        for g in range(G):
            sg, sgx = 0.0, 0.0
            for k in range(n):
                gg = dy[b, g, k] * gamma[g, k]
                sg += gg
                sgx += gg * xhat[b, g, k]
            rnd[0], rnd[1] = sg / n, sgx / n
            mg, mgx = rnd[0], rnd[1]
            r = rstd[b, g, 0]
            for k in range(n):
                gg = dy[b, g, k] * gamma[g, k]
                dx[b, g, k] = r * (gg - mg - xhat[b, g, k] * mgx)
    return dx


def _expand(p, x, G):
    """(C,) -> (G, C/G * S): the per-channel vector repeated over its channel's positions."""
    B, C = x.shape[:2]
    S = int(np.prod(x.shape[2:], dtype=np.int64))
    return np.ascontiguousarray(np.broadcast_to(np.asarray(p, dtype=x.dtype)[:, None], (C, S)).reshape(G, -1))


def group_norm_forward_v1(x, num_groups, gamma, beta, eps=1e-5):
    _check(x, num_groups, gamma, beta)
    x = np.ascontiguousarray(x)
    B, G = x.shape[0], num_groups
    y, xhat, rstd = _gn_fwd_v1(x.reshape(B, G, -1), _expand(gamma, x, G), _expand(beta, x, G),
                               x.dtype.type(eps), x.dtype.type(1))
    return y.reshape(x.shape), (xhat.reshape(x.shape), rstd, np.asarray(gamma, dtype=x.dtype))


def group_norm_backward_v1(dy, cache):
    xhat, rstd, gamma = cache
    B, C = xhat.shape[:2]
    G = rstd.shape[1]
    dy = np.ascontiguousarray(dy, dtype=xhat.dtype)
    axes = (0,) + tuple(range(2, xhat.ndim))
    dgamma, dbeta = (dy * xhat).sum(axis=axes), dy.sum(axis=axes)
    dx = _gn_bwd_v1(dy.reshape(B, G, -1), xhat.reshape(B, G, -1), rstd, _expand(gamma, xhat, G))
    return dx.reshape(xhat.shape), dgamma, dbeta


def group_norm_silu_forward_v1(x, num_groups, gamma, beta, eps=1e-5):
    z, norm_cache = group_norm_forward_v1(x, num_groups, gamma, beta, eps)
    y, act_cache = silu_forward_v1(z)
    return y, (norm_cache, act_cache)


def group_norm_silu_backward_v1(dy, cache):
    norm_cache, act_cache = cache
    return group_norm_backward_v1(silu_backward_v1(dy, act_cache), norm_cache)


# ============================ version 2: channel-major, parallel, fused ========================
# Plane sums in float64 with reassociation allowed: without it each sum is one chain of
# dependent adds (4 cycles each), which LLVM may not vectorise; measured 1.33 ms for a
# group_norm forward on unet-seed's (128, 10, 28, 28) activations, most of it in these sums.
_SUM = dict(cache=True, fastmath={"reassoc", "nsz", "arcp", "contract"})


@njit(**_SUM)
def _plane_sum(x, c, b):
    acc = 0.0
    for s in range(x.shape[2]):
        acc += x[c, b, s]
    return acc


@njit(**_SUM)
def _plane_sqdev(x, c, b, mu):
    acc = 0.0
    for s in range(x.shape[2]):
        d = np.float64(x[c, b, s] - mu)
        acc += d * d
    return acc


@njit(**_SUM)
def _plane_bwd_sums(dy, x, c, b, mu, r):
    """(sum dy xhat, sum dy) over one (channel, sample) plane, xhat = (x - mu) r in the dtype."""
    pg, pb = 0.0, 0.0
    for s in range(x.shape[2]):
        d = np.float64(dy[c, b, s])
        pg += d * np.float64((x[c, b, s] - mu) * r)
        pb += d
    return pg, pb


@njit(parallel=True, **_JIT)
def _gn_fwd_v2(x, G, gamma, beta, eps, half, one, with_silu, y, mean, rstd):
    C, B, S = x.shape
    Cg = C // G
    n = Cg * S
    for task in prange(B * G):
        b, g = task // G, task % G
        acc = 0.0
        for c in range(g * Cg, (g + 1) * Cg):
            acc += _plane_sum(x, c, b)
        mean[b, g] = acc / n                                # stored: rounded to the dtype
        mu = mean[b, g]
        acc = 0.0
        for c in range(g * Cg, (g + 1) * Cg):
            acc += _plane_sqdev(x, c, b, mu)
        rstd[b, g] = acc / n                                # var, rounded to the dtype
        r = one / math.sqrt(rstd[b, g] + eps)
        rstd[b, g] = r
        for c in range(g * Cg, (g + 1) * Cg):
            ga, be = gamma[c], beta[c]
            for s in range(S):
                z = ((x[c, b, s] - mu) * r) * ga + be
                if with_silu:
                    z = z * (half * (one + math.tanh(half * z)))
                y[c, b, s] = z


@njit(parallel=True, **_JIT)
def _gn_bwd_v2(dy, x, G, gamma, beta, mean, rstd, half, one, with_silu, dx, dgam_p, dbet_p, rnd):
    C, B, S = x.shape
    Cg = C // G
    n = Cg * S
    for task in prange(B * G):
        b, g = task // G, task % G
        mu, r = mean[b, g], rstd[b, g]
        sg, sgx = 0.0, 0.0
        for c in range(g * Cg, (g + 1) * Cg):
            ga, be = gamma[c], beta[c]
            if not with_silu:                               # sum_s dy ga = ga pb; sum_s dy ga xh = ga pg
                pg, pb = _plane_bwd_sums(dy, x, c, b, mu, r)
                dgam_p[b, c], dbet_p[b, c] = pg, pb
                sg += ga * pb
                sgx += ga * pg
                continue
            pg, pb = 0.0, 0.0
            for s in range(S):                              # with SiLU (without, see above):
                xh = (x[c, b, s] - mu) * r
                z = xh * ga + be                            # dz = dy * silu'(z), z = xh ga + be
                sz = half * (one + math.tanh(half * z))
                d = dy[c, b, s] * (sz * (one + z * (one - sz)))
                dx[c, b, s] = d                             # keep dz for the second pass
                pg += d * xh
                pb += d
                gg = d * ga
                sg += gg
                sgx += gg * xh
            dgam_p[b, c], dbet_p[b, c] = pg, pb
        rnd[b, g, 0], rnd[b, g, 1] = sg / n, sgx / n       # rounded to the dtype
        mg, mgx = rnd[b, g, 0], rnd[b, g, 1]
        for c in range(g * Cg, (g + 1) * Cg):
            ga = gamma[c]
            for s in range(S):
                xh = (x[c, b, s] - mu) * r
                d = dx[c, b, s] if with_silu else dy[c, b, s]
                dx[c, b, s] = r * (d * ga - mg - xh * mgx)


def _gn_forward_v2(x, num_groups, gamma, beta, eps, with_silu):
    _check(x, num_groups, gamma, beta)
    xc = cm(x)
    dt = xc.dtype
    C, B = xc.shape[:2]
    x3 = xc.reshape(C, B, -1)
    y = np.empty_like(x3)
    mean, rstd = np.empty((B, num_groups), dt), np.empty((B, num_groups), dt)
    gamma, beta = np.ascontiguousarray(gamma, dtype=dt), np.ascontiguousarray(beta, dtype=dt)
    _gn_fwd_v2(x3, num_groups, gamma, beta, dt.type(eps), dt.type(0.5), dt.type(1), with_silu, y, mean, rstd)
    return nchw(y.reshape(xc.shape)), (x3, xc.shape, num_groups, gamma, beta, mean, rstd, with_silu)


def _gn_backward_v2(dy, cache):
    x3, shape, G, gamma, beta, mean, rstd, with_silu = cache
    dt = x3.dtype
    C, B = shape[:2]
    dy3 = cm(dy, dt).reshape(C, B, -1)
    dx = np.empty_like(x3)
    dgam_p, dbet_p = np.empty((B, C)), np.empty((B, C))
    rnd = np.empty((B, G, 2), dt)
    _gn_bwd_v2(dy3, x3, G, gamma, beta, mean, rstd, dt.type(0.5), dt.type(1), with_silu, dx, dgam_p, dbet_p, rnd)
    return nchw(dx.reshape(shape)), dgam_p.sum(axis=0).astype(dt), dbet_p.sum(axis=0).astype(dt)


def group_norm_forward_v2(x, num_groups, gamma, beta, eps=1e-5):
    return _gn_forward_v2(x, num_groups, gamma, beta, eps, False)


def group_norm_silu_forward_v2(x, num_groups, gamma, beta, eps=1e-5):
    return _gn_forward_v2(x, num_groups, gamma, beta, eps, True)


group_norm_backward_v2 = group_norm_silu_backward_v2 = _gn_backward_v2

KERNELS = {
    "group_norm": {1: (group_norm_forward_v1, group_norm_backward_v1), 2: (group_norm_forward_v2, group_norm_backward_v2)},
    "group_norm_silu": {1: (group_norm_silu_forward_v1, group_norm_silu_backward_v1),
                        2: (group_norm_silu_forward_v2, group_norm_silu_backward_v2)},
}
