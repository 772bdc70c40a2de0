"""The VAE's likelihood bound in bits per dimension, comparable with the diffusion models' (reference).

refdiff.nn.vae's decoder is trained with the Bernoulli cross-entropy on pixel intensities
u in [0, 1] (refdiff.objectives.VAEObjective): sum_i u_i log lam_i + (1 - u_i) log(1 - lam_i)
is not the log of a density over u in [0, 1] (it does not integrate to 1 over the cube), so
"-ELBO" with it is no bound on a likelihood. The continuous Bernoulli (Loaiza-Ganem &
Cunningham 2019, eq. 3-4) is the same expression with its normaliser, a proper density on [0, 1]:

    p(u | lam) = C(lam) lam^u (1 - lam)^(1 - u),
    C(lam) = 2 artanh(1 - 2 lam) / (1 - 2 lam)   (lam != 1/2),   C(1/2) = 2.

With lam = sigmoid(l) for the decoder's logit l, 1 - 2 lam = -tanh(l / 2) and
artanh(1 - 2 lam) = -l / 2, so

    C = l / tanh(l / 2)        (-> 2 as l -> 0: 2 + l^2 / 6 + O(l^4)),                     (1)
    log p(u | l) = u l - softplus(l) + log C(l)                                             (2)

(`cb_log_normalizer`, `cb_log_prob`: no cancellation anywhere, for any l). Every decoder
gives a lower bound with eq. (2), the one trained with the plain Bernoulli term too (the bound
is then looser than that of a decoder trained with eq. 2). For one image u (D pixels),
z ~ q(z | u) = N(mu, diag e^logvar) from the encoder:

    ELBO(u) = E_q[log p(u | z)] - KL(q(z | u) || N(0, I)) <= log p(u)     (Kingma & Welling 2014, eq. 3)
    IWAE_K(u) = E[log 1/K sum_k p(u | z_k) p(z_k) / q(z_k | u)]   (Burda et al. 2016, eq. 8)

with ELBO = IWAE_1 <= IWAE_K <= log p(u) (Burda et al. thm. 1). The KL is in closed form;
E_q is estimated with `samples` draws (`elbo`), the IWAE bound with `k` draws (`iwae`).

Bits per dimension follow the diffusion likelihood's convention (refdiff.likelihood, score_sde):
8-bit pixels p are dequantised u = (p + v) / 256, v ~ U[0, 1)^D, a density on [0, 1)^D, and

    bpd = -bound / (D ln 2) + log2(256 / (1 - 0)) = -bound / (D ln 2) + 8                 (3)

(refdiff.likelihood.bits_per_dim with data_range (0, 1)): the same number of bits per pixel
as the diffusion model's bpd = -log p_y(y) / (D ln 2) + 7 on y in [-1, 1), since both are
-log of a density of the same dequantised 8-bit image, expressed on [0, 256)^D. A lower
bound on log p gives an upper bound on the bits/dim.

Shapes: pixels (n, 1, 28, 28) integers 0..255; logits (B, D); mu, logvar (B, L).
Must agree with (tests/test_vae_likelihood.py): C of eq. (1) against the integral of
lam^u (1 - lam)^(1 - u) over [0, 1] by quadrature; ELBO <= IWAE_K <= log p(u) with log p(u)
integrated over a one-dimensional latent by quadrature, IWAE_K -> log p(u) as K grows.
"""
from __future__ import annotations

import math

import numpy as np

from ._checks import check_int, check_rng
from .likelihood import bits_per_dim, dequantize

SMALL_LOGIT = 1e-4          # below: log 2 + l^2 / 12, the series of log C; its next term, -7 l^4 / 1440, is < 5e-19


def cb_log_normalizer(logits):
    """log C of eq. (1) for decoder logits l (any shape), float64."""
    l = np.asarray(logits, dtype=np.float64)
    small = np.abs(l) < SMALL_LOGIT
    safe = np.where(small, 1.0, l)
    return np.where(small, math.log(2.0) + l * l / 12.0, np.log(safe / np.tanh(safe / 2.0)))


def softplus(l):
    """log(1 + e^l), without overflow."""
    l = np.asarray(l, dtype=np.float64)
    return np.maximum(l, 0.0) + np.log1p(np.exp(-np.abs(l)))


def cb_log_prob(u, logits):
    """Eq. (2) summed over the last axis: log p(u | l) of the continuous Bernoulli, (B,)."""
    l = np.asarray(logits, dtype=np.float64)
    u = np.asarray(u, dtype=np.float64)
    return np.sum(u * l - softplus(l) + cb_log_normalizer(l), axis=-1)


def _encode_decode(model, u, eps):
    """(log p(u | z) (B,), z (B, L), mu, logvar) for one draw eps (B, L): the encoder sees x = 2u - 1."""
    F = model.ops
    x = F.asarray((2.0 * u - 1.0).reshape((u.shape[0],) + (1, 28, 28)).astype(model.dtype))
    mu, logvar, _ = model.encode(x)
    mu, logvar = (np.asarray(F.to_numpy(a), dtype=np.float64) for a in (mu, logvar))
    z = mu + np.exp(0.5 * logvar) * eps
    logits, _ = model.decode(F.asarray(z.astype(model.dtype)))
    return cb_log_prob(u, F.to_numpy(logits)), z, mu, logvar


def elbo(model, u, rng, samples=1):
    """ELBO(u) per image (B,) with eq. (2) as the decoder's density: the closed-form KL and
    E_q[log p(u | z)] as the mean over `samples` draws. u (B, 784) in [0, 1]."""
    check_int(samples, "samples", lo=1)
    rec = 0.0
    for _ in range(samples):
        lp, _, mu, logvar = _encode_decode(model, u, rng.standard_normal((u.shape[0], model.config["latent"])))
        rec = rec + lp / samples
    kl = 0.5 * np.sum(mu * mu + np.exp(logvar) - 1.0 - logvar, axis=1)
    return rec - kl


def iwae(model, u, rng, k=100):
    """IWAE_K(u) per image (B,), K = k draws from q(z | u). u (B, 784) in [0, 1]."""
    check_int(k, "k", lo=1)
    L = model.config["latent"]
    terms = []
    for _ in range(k):
        eps = rng.standard_normal((u.shape[0], L))
        lp, z, mu, logvar = _encode_decode(model, u, eps)
        log_pz = -0.5 * np.sum(z * z, axis=1) - 0.5 * L * math.log(2 * math.pi)
        log_q = -0.5 * np.sum(eps * eps + logvar, axis=1) - 0.5 * L * math.log(2 * math.pi)
        terms.append(lp + log_pz - log_q)
    w = np.stack(terms)                                                    # (k, B)
    top = w.max(axis=0)
    return top + np.log(np.mean(np.exp(w - top), axis=0))


def vae_bits_per_dim(model, pixels, rng, samples=10, k=100, batch=100):
    """Eq. (3) for 8-bit images under a VAE checkpoint: pixels (n, 1, 28, 28) integers 0..255,
    dequantised with `rng` (refdiff.likelihood.dequantize onto [0, 1)), then per image the ELBO
    (`samples` draws) and the IWAE bound (`k` draws). -> dict(elbo_bpd (n,), iwae_bpd (n,))."""
    check_rng(rng)
    check_int(batch, "batch", lo=1)
    pixels = np.asarray(pixels)
    if pixels.ndim < 2 or int(np.prod(pixels.shape[1:])) != 784:
        raise ValueError(f"pixels must be (n, 1, 28, 28) images; got shape {pixels.shape}")
    u = dequantize(pixels, rng, data_range=(0.0, 1.0)).reshape(pixels.shape[0], 784)
    out = dict(elbo_bpd=[], iwae_bpd=[])
    for s in range(0, u.shape[0], batch):
        ub = u[s:s + batch]
        out["elbo_bpd"].append(bits_per_dim(elbo(model, ub, rng, samples), 784, data_range=(0.0, 1.0)))
        out["iwae_bpd"].append(bits_per_dim(iwae(model, ub, rng, k), 784, data_range=(0.0, 1.0)))
    return {key: np.concatenate(v) for key, v in out.items()}


__all__ = ["cb_log_normalizer", "cb_log_prob", "softplus", "elbo", "iwae", "vae_bits_per_dim"]
