"""Sampler updates as ops (NumPy reference; the specification for every backend's twin).

refdiff.ddpm's ancestral sampler and em_vp call them through `model.ops`, so that an
accelerated backend can fuse each update into one pass over the batch, on its device.
Scalars are per step (the whole batch shares t), computed in float64 by the caller and cast to x's dtype here, exactly as NumPy would cast them.

    ddpm_step   Ho et al. 2020, Alg. 2 line 4 (report §3.3.1):
                x <- (x - beta_t / sqrt(1 - abar_t) eps_theta) / sqrt(1 - beta_t) + sigma_t z
    em_step     reverse-time Euler-Maruyama for the linear-drift SDEs f(x, t) = -a(t) x
                (refdiff.samplers.euler_maruyama): with dt > 0 the step back in time,
                x <- x - (-a x - g^2 score) dt + g sqrt(dt) z
z = None means no noise (the last step). x, eps, score, z: (B, ...) of one dtype.
"""
from __future__ import annotations

import math

import numpy as np

__all__ = ["ddpm_step", "em_step"]     # the ops; the *_coeffs helpers are imported by name


def ddpm_coeffs(beta, alpha_bar, dtype):
    """(coef_eps, inv_sqrt_alpha) in float64, then cast to dtype: the two step scalars."""
    cast = np.dtype(dtype).type
    return cast(beta / math.sqrt(1.0 - alpha_bar)), cast(1.0 / math.sqrt(1.0 - beta))


def ddpm_step(x, eps, z, beta, alpha_bar, sigma):
    """One ancestral step. beta = beta_t, alpha_bar = abar_t, sigma = sigma_t (floats)."""
    coef, inv_sqrt_alpha = ddpm_coeffs(beta, alpha_bar, x.dtype)
    out = (x - coef * eps) * inv_sqrt_alpha
    if z is not None:
        out += x.dtype.type(sigma) * z
    return out


def em_coeffs(a, g, dt, dtype):
    """(a dt, g^2 dt, g sqrt(dt)) in float64, then cast to dtype."""
    cast = np.dtype(dtype).type
    return cast(a * dt), cast(g * g * dt), cast(g * math.sqrt(dt))


def em_step(x, score, z, a, g, dt):
    """One reverse Euler-Maruyama step of dx = -a x dt + g dW; a, g at the current t, dt > 0."""
    adt, g2dt, noise = em_coeffs(a, g, dt, x.dtype)
    out = x + adt * x + g2dt * score
    if z is not None:
        out += noise * z
    return out
