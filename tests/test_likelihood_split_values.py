"""refdiff.likelihood.split_image_bits_per_dim in one process (SingleProcess), checked by value:
an oracle eps-model of correlated Gaussian data, whose probability-flow trajectory and
Hutchinson integrand are written here in closed form, gives each image's bits/dim from its own
documented random stream (default_rng([seed, k]): the dequantisation noise, then the probes).
The MPI tests (test_mpi_evaluate.py) show that every number of ranks gives these same values."""
import math

import numpy as np
import pytest
from scipy.integrate import quad

from refdiff import likelihood as L
from refdiff.backend import REFERENCE
from refdiff.distributed import SingleProcess
from refdiff.solvers import continuous_sde

SHAPE = (1, 2, 2)                                   # one image: D = 4 "pixels"
D = 4
_A = np.array([[1.0, 0.6, 0.0, 0.2], [0.0, 0.8, -0.4, 0.0], [0.3, 0.0, 0.5, 0.1], [0.0, 0.2, 0.0, 0.7]])
COV = _A @ _A.T                                     # the data's covariance: data ~ N(0, COV)
EXACT = math.sqrt(D) * np.eye(D).reshape((D,) + SHAPE)    # "probes" whose mean v^T M v is tr M


class GaussianEpsModel:
    """eps(x, t) = std_t Sigma_t^{-1} x, Sigma_t = gamma_t^2 COV + std_t^2 I: the exact noise
    prediction for data N(0, COV) (score -Sigma_t^{-1} x). Linear in x and symmetric, so its
    forward-mode tangent and its input gradient are the same map."""

    kind, name, dtype, ops, input_shape = "eps", "gaussian-oracle", np.float64, REFERENCE, SHAPE

    def __init__(self, sde):
        self.sde = sde

    def _maps(self, t):
        gamma, std = self.sde.marginal_coeffs(np.asarray(t, dtype=np.float64))
        return std, [s * np.linalg.inv(g * g * COV + s * s * np.eye(D)) for g, s in zip(gamma, std)]

    def _apply(self, t, x):
        std, maps = self._maps(t)
        flat = x.reshape(x.shape[0], D)
        return np.stack([m @ row for m, row in zip(maps, flat)]).reshape(x.shape)

    def forward(self, x, t):
        self._t = t
        return self._apply(t, x)

    def forward_jvp(self, x, t, v):
        return self._apply(t, x), self._apply(t, v)

    def backward(self, g):
        return self._apply(self._t, g)

    def zero_grad(self):
        pass


def noise(seed, k):
    """Image k's dequantisation noise: the first draw of its stream default_rng([seed, k])."""
    return np.random.default_rng([seed, k]).uniform(0.0, 1.0, SHAPE)


def expected_bpd(sde, u, probes, pixels, t_min):
    """Bits/dim of one image by eq. (1)-(2) with the flow and the integrand in closed form.
    In COV's eigenbasis (eigenvalues lam) the probability-flow ODE keeps each coordinate's
    z / sqrt(Sigma_t), so x(T) = Q diag(sqrt(Sigma_T / Sigma_tmin)) Q^T x; the divergence of the
    drift with the fixed probes v_p is -a D + 1/2 g^2 mean_p v_p^T Sigma_t^{-1} v_p."""
    y = (-1.0 + 2.0 * (pixels.astype(np.float64) + u) / 256.0).reshape(D)
    lam, Q = np.linalg.eigh(COV)
    vq = probes.reshape(len(probes), D) @ Q                           # probes in the eigenbasis

    def sigma(t):
        g, s = sde.marginal_coeffs(np.float64(t))
        return g * g * lam + s * s

    def integrand(t):
        g2 = float(sde.diffusion(np.float64(t))) ** 2
        return -float(sde.a(np.float64(t))) * D + 0.5 * g2 * np.mean(np.sum(vq ** 2 / sigma(t), axis=1))

    delta = quad(integrand, t_min, sde.T, epsabs=1e-12, epsrel=1e-12, limit=200)[0]
    xT = Q @ (np.sqrt(sigma(sde.T) / sigma(t_min)) * (Q.T @ y))
    logp = float(sde.prior_logp(xT[None])[0]) + delta
    return -logp / (D * math.log(2)) + math.log2(128.0)


@pytest.mark.parametrize("route", ["jvp", "vjp"])
def test_split_bits_per_dim_per_image_streams_in_closed_form(route):
    meta, seed, probes, t_min = {}, 11, 2, 1e-3
    sde = continuous_sde(meta, "the test")
    model = GaussianEpsModel(sde)
    pixels = np.random.default_rng(5).integers(0, 256, size=(5,) + SHAPE)
    res = L.split_image_bits_per_dim(SingleProcess(), model, meta, pixels, seed, batch=2, probes=probes,
                                     rtol=1e-9, atol=1e-9, t_min=t_min, route=route)
    expect = []
    for k in range(5):
        g = np.random.default_rng([seed, k])
        u = g.uniform(0.0, 1.0, SHAPE)
        v = 2.0 * g.integers(0, 2, size=(probes,) + SHAPE) - 1.0
        expect.append(expected_bpd(sde, u, v, pixels[k], t_min))
    # RK45 at 1e-9 over < 100 steps of a state of size ~1: an error ~1e-7 nats, 5e-8 bits/dim.
    np.testing.assert_allclose(res["bpd"], expect, rtol=0, atol=1e-6)
    assert res["route"] == route
    assert len(res["nfe"]) == 3 and all(isinstance(n, int) and n > 0 for n in res["nfe"])
    # The probes enter: with the exact trace instead (probes sqrt(D) e_i, whose mean is tr), the
    # expected bits/dim move by far more than the tolerance, so a wrong probe would be seen.
    exact = [expected_bpd(sde, noise(seed, k), EXACT, pixels[k], t_min) for k in range(5)]
    assert np.max(np.abs(np.subtract(exact, expect))) > 1e-3


def test_split_bits_per_dim_exact_divergence_and_batches():
    # divergence="exact" draws no probes: the bits/dim are the exact-trace ones, the same for
    # any batch size (each image's stream is its own), and one NFE per solve.
    meta, seed, t_min = {}, 3, 1e-3
    sde = continuous_sde(meta, "the test")
    model = GaussianEpsModel(sde)
    pixels = np.random.default_rng(8).integers(0, 256, size=(4,) + SHAPE)
    expect = [expected_bpd(sde, noise(seed, k), EXACT, pixels[k], t_min) for k in range(4)]
    for batch, solves in ((4, 1), (3, 2), (1, 4)):
        res = L.split_image_bits_per_dim(SingleProcess(), model, meta, pixels, seed, batch=batch,
                                         divergence="exact", rtol=1e-9, atol=1e-9, t_min=t_min)
        np.testing.assert_allclose(res["bpd"], expect, rtol=0, atol=1e-6)
        assert len(res["nfe"]) == solves
