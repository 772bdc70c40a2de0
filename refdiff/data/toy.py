"""2-D toy distributions, and a Gaussian mixture with its exact diffused score.

Shapes: samples are (N, D); D = 2 for all toys except `GaussianMixture` (any D).
"""
from __future__ import annotations

import numpy as np

from .._checks import check_array_float, check_int, check_real, check_rng


def _check_n(n, rng, noise):
    """The checks every toy shares: n >= 1 samples, a Generator, a finite noise >= 0."""
    check_int(n, "n", lo=1)
    check_rng(rng)
    check_real(noise, "noise", lo=0)


def ring(n, rng, radius=1.0, noise=0.1):
    """The report's ring (fig. 2.1, authors' code): angle ~ U(0, 2 pi),
    r = radius + noise N(0, 1)."""
    _check_n(n, rng, noise)
    check_real(radius, "radius", lo=0, lo_open=True)
    theta = rng.uniform(0, 2 * np.pi, n)
    r = radius + noise * rng.standard_normal(n)
    return np.stack([r * np.cos(theta), r * np.sin(theta)], axis=1)


def moons(n, rng, noise=0.05):
    """Two interleaved half circles (as scikit-learn's make_moons), centred and scaled to
    roughly unit variance."""
    _check_n(n, rng, noise)
    n1 = n // 2
    a = rng.uniform(0, np.pi, n)
    x = np.where(np.arange(n) < n1, np.cos(a), 1 - np.cos(a))
    y = np.where(np.arange(n) < n1, np.sin(a), 0.5 - np.sin(a))
    pts = np.stack([x, y], axis=1) + noise * rng.standard_normal((n, 2))
    pts = pts[rng.permutation(n)]
    return (pts - np.array([0.5, 0.25])) / 0.75


def swiss_roll(n, rng, noise=0.05):
    """2-D swiss roll, scaled to roughly unit variance."""
    _check_n(n, rng, noise)
    u = 1.5 * np.pi * (1 + 2 * rng.uniform(0, 1, n))
    pts = np.stack([u * np.cos(u), u * np.sin(u)], axis=1) / 7.5
    return pts + noise * rng.standard_normal((n, 2))


class GaussianMixture:
    """sum_k w_k N(m_k, C_k) in D dimensions, with its exact score under any linear SDE.

    Under p_{t|0} = N(gamma_t x0, std_t^2 I) each component stays Gaussian:
    N(gamma_t m_k, gamma_t^2 C_k + std_t^2 I); the diffused density is the mixture of
    those, and its score is the responsibility-weighted sum of the component scores.
    This is the oracle that separates sampler error from learning error.
    """

    def __init__(self, weights, means, covs):
        self.weights = check_array_float(weights, "weights")     # (K,)
        self.means = check_array_float(means, "means")            # (K, D)
        self.covs = check_array_float(covs, "covs")               # (K, D, D)
        K = self.weights.shape[0]
        if self.weights.ndim != 1 or np.any(self.weights <= 0) or not np.isclose(self.weights.sum(), 1):
            raise ValueError("weights must be a 1-D array of positive numbers summing to 1")
        if self.means.ndim != 2 or self.means.shape[0] != K:
            raise ValueError(f"means must have shape (K={K}, D); got {self.means.shape}")
        D = self.means.shape[1]
        if self.covs.shape != (K, D, D):
            raise ValueError(f"covs must have shape ({K}, {D}, {D}); got {self.covs.shape}")
        self.chols = np.linalg.cholesky(self.covs)               # raises if not SPD
        self.eigvals, self.eigvecs = np.linalg.eigh(self.covs)   # C_k = U_k diag(l_k) U_k^T
        self.dim = D

    @classmethod
    def default(cls):
        """Eight well separated isotropic components on a circle of radius 2 (std 0.15)."""
        ang = np.arange(8) * 2 * np.pi / 8
        means = 2.0 * np.stack([np.cos(ang), np.sin(ang)], axis=1)
        return cls(np.full(8, 1 / 8), means, np.tile(0.15 ** 2 * np.eye(2), (8, 1, 1)))

    def sample(self, n, rng):
        _check_n(n, rng, 0.0)
        k = rng.choice(len(self.weights), size=n, p=self.weights)
        z = rng.standard_normal((n, self.dim))
        return self.means[k] + np.einsum("nij,nj->ni", self.chols[k], z)

    def __call__(self, n, rng):
        return self.sample(n, rng)

    def score(self, x, t, sde):
        """Exact grad_x log p_t(x) under `sde`; x (N, D), t scalar or (N,) -> (N, D)."""
        x = check_array_float(x, "x", finite=False)
        gamma, std = sde.marginal_coeffs(np.broadcast_to(np.asarray(t, dtype=np.float64), (x.shape[0],)))
        # Sigma_nk = gamma_n^2 C_k + std_n^2 I = U_k diag(gamma_n^2 l_k + std_n^2) U_k^T
        lam = gamma[:, None, None] ** 2 * self.eigvals[None] + std[:, None, None] ** 2   # (N, K, D)
        diff = x[:, None, :] - gamma[:, None, None] * self.means[None]                 # (N, K, D)
        U = self.eigvecs[None]                                                          # (1, K, D, D)
        y = np.sum(diff[..., :, None] * U, axis=-2)                                     # U^T diff
        sol = np.sum((y / lam)[..., None, :] * U, axis=-1)                              # Sigma^{-1} diff
        logp = (np.log(self.weights)[None] - 0.5 * np.sum(np.log(lam), axis=-1)
                - 0.5 * np.sum(y * y / lam, axis=-1))
        resp = np.exp(logp - logp.max(axis=1, keepdims=True))
        resp /= resp.sum(axis=1, keepdims=True)                                 # (N, K)
        return -np.sum(resp[..., None] * sol, axis=1)


TOY = {"ring": ring, "moons": moons, "swiss_roll": swiss_roll, "gmm": lambda n, rng: GaussianMixture.default().sample(n, rng)}


def make_toy(name):
    if name not in TOY:
        raise ValueError(f"unknown toy dataset {name!r}; choose one of {sorted(TOY)}")
    return TOY[name]
