"""Loss ops and the VAE's Gaussian latent, as forward/backward pairs (reference).

    log_softmax_cross_entropy   logits (B, K), labels (B,) int   -> mean_b -log softmax(z_b)[y_b]
    bce_with_logits             logits (B, ...), targets same    -> sum (or mean) of BCE(sigmoid(z), t)
    gaussian_kl                 mu, logvar (B, D)                -> sum KL(N(mu, e^logvar) || N(0, I))
    gaussian_reparam            mu, logvar, eps (B, D)           -> z = mu + e^(logvar/2) eps

Losses return a Python float and take an upstream scalar `dloss` in their backward (1.0
for the loss itself), so that `check_grads` can drive them like any other op. Everything
is written in the overflow-free form; the docstrings give the identity used.

This module is part of the specification (see functional.py): accelerated backends carry
the same names and signatures.
"""
from __future__ import annotations

import numpy as np

__all__ = [
    "log_softmax_forward", "log_softmax_cross_entropy_forward", "log_softmax_cross_entropy_backward",
    "bce_with_logits_forward", "bce_with_logits_backward",
    "gaussian_kl_forward", "gaussian_kl_backward",
    "gaussian_reparam_forward", "gaussian_reparam_backward",
]

REDUCTIONS = ("sum", "mean")


def _finite(name, a):
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} contains NaN or Inf")


# --- cross-entropy ------------------------------------------------------------------------------
def log_softmax_forward(logits):
    """log softmax over the last axis: z - max z - log sum exp(z - max z) (never overflows)."""
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def log_softmax_cross_entropy_forward(logits, labels):
    """L = (1/B) sum_b -log softmax(z_b)[y_b]  (PyTorch's CrossEntropyLoss, mean reduction).

    logits (B, K) float, labels (B,) integers in [0, K). Returns (float loss, cache).
    """
    labels = np.asarray(labels)
    if logits.ndim != 2 or logits.shape[0] < 1 or logits.shape[1] < 1:
        raise ValueError(f"cross-entropy: logits must have shape (B, K) with B, K >= 1; got {logits.shape}")
    if labels.shape != (logits.shape[0],):
        raise ValueError(f"cross-entropy: labels must have shape ({logits.shape[0]},); got {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"cross-entropy: labels must be integers; got dtype {labels.dtype}")
    if labels.min() < 0 or labels.max() >= logits.shape[1]:
        raise ValueError(f"cross-entropy: labels must lie in [0, {logits.shape[1]}); "
                         f"got values in [{labels.min()}, {labels.max()}]")
    _finite("cross-entropy: logits", logits)
    logp = log_softmax_forward(logits)                                # (B, K)
    rows = np.arange(logits.shape[0])
    loss = -float(np.mean(logp[rows, labels]))
    return loss, (logp, labels)


def log_softmax_cross_entropy_backward(dloss, cache):
    """dL/dz = (softmax(z) - onehot(y)) / B, times the upstream scalar dloss."""
    logp, labels = cache
    g = np.exp(logp)
    g[np.arange(g.shape[0]), labels] -= 1
    return (g * (float(dloss) / g.shape[0])).astype(logp.dtype, copy=False)


# --- binary cross-entropy -------------------------------------------------------------------------
def bce_with_logits_forward(logits, targets, reduction="sum"):
    """BCE(sigmoid(z), t) = -t log s(z) - (1-t) log(1 - s(z)) = max(z, 0) - z t + log(1 + e^-|z|).

    The right-hand form is exact and finite for every z (PyTorch's BCEWithLogitsLoss).
    `reduction`: "sum" over every element (the VAE's BCE(sum)) or "mean" over every element.
    targets in [0, 1], same shape as logits. Returns (float loss, cache).
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"bce_with_logits: reduction must be one of {REDUCTIONS}; got {reduction!r}")
    targets = np.asarray(targets, dtype=logits.dtype)
    if targets.shape != logits.shape:
        raise ValueError(f"bce_with_logits: targets have shape {targets.shape}, logits {logits.shape}")
    if logits.size == 0:
        raise ValueError("bce_with_logits: empty logits")
    _finite("bce_with_logits: logits", logits)
    if not (np.all(targets >= 0) and np.all(targets <= 1)):
        raise ValueError("bce_with_logits: targets must lie in [0, 1] (NaN included in the check)")
    per = np.maximum(logits, 0) - logits * targets + np.log1p(np.exp(-np.abs(logits)))
    scale = 1.0 if reduction == "sum" else 1.0 / logits.size
    return float(per.sum(dtype=np.float64) * scale), (logits, targets, scale)


def bce_with_logits_backward(dloss, cache):
    """dL/dz = (sigmoid(z) - t) * scale * dloss;  sigmoid via tanh (no overflow)."""
    logits, targets, scale = cache
    s = 0.5 * (1 + np.tanh(0.5 * logits))
    return ((s - targets) * (float(dloss) * scale)).astype(logits.dtype, copy=False)


# --- the VAE's Gaussian latent ----------------------------------------------------------------------
def gaussian_kl_forward(mu, logvar):
    """KL(N(mu, diag e^logvar) || N(0, I)) summed over batch and latent dims (Kingma & Welling
    2014, appendix B):  -1/2 sum (1 + logvar - mu^2 - e^logvar).  mu, logvar (B, D)."""
    if mu.shape != logvar.shape:
        raise ValueError(f"gaussian_kl: mu {mu.shape} and logvar {logvar.shape} differ in shape")
    var = np.exp(logvar)
    kl = -0.5 * float(np.sum(1 + logvar - mu * mu - var, dtype=np.float64))
    return kl, (mu, var)


def gaussian_kl_backward(dloss, cache):
    """-> dmu = mu dloss, dlogvar = (e^logvar - 1)/2 dloss."""
    mu, var = cache
    d = float(dloss)
    return (mu * d).astype(mu.dtype, copy=False), (0.5 * (var - 1) * d).astype(mu.dtype, copy=False)


def gaussian_reparam_forward(mu, logvar, eps):
    """z = mu + sigma eps, sigma = e^(logvar/2) (the reparameterisation trick). eps ~ N(0, I)
    is drawn by the caller with an explicit Generator, so this op is deterministic."""
    if not (mu.shape == logvar.shape == eps.shape):
        raise ValueError(f"gaussian_reparam: mu {mu.shape}, logvar {logvar.shape}, eps {eps.shape} differ")
    sigma = np.exp(0.5 * logvar)
    return mu + sigma * eps, (sigma, eps)


def gaussian_reparam_backward(dz, cache):
    """-> dmu = dz, dlogvar = dz eps sigma / 2, deps = dz sigma."""
    sigma, eps = cache
    return dz, 0.5 * dz * eps * sigma, dz * sigma
