"""refdiff.vae_likelihood: the continuous Bernoulli's normaliser against quadrature, and the
VAE's bounds against the log-likelihood of a one-dimensional latent integrated by quadrature."""
import math

import numpy as np
import pytest
from scipy.integrate import quad
from scipy.special import logsumexp

from refdiff import vae_likelihood as V
from refdiff.nn.vae import VAE


@pytest.mark.parametrize("l", [0.0, 3e-5, -2e-4, 0.7, -3.0, 12.0, -40.0])
def test_normaliser_against_quadrature(l):
    # 1 / C = int_0^1 lam^u (1 - lam)^(1 - u) du (quad: ~1e-14 relative here), and the density
    # of eq. (2) integrates to 1; both to 1e-10 (the series branch included: |l| < 1e-4).
    lam = 1.0 / (1.0 + math.exp(-l))
    inv_c, _ = quad(lambda u: lam ** u * (1 - lam) ** (1 - u), 0.0, 1.0, epsabs=0, epsrel=1e-13)
    assert abs(float(V.cb_log_normalizer(l)) + math.log(inv_c)) < 1e-10
    mass, _ = quad(lambda u: math.exp(float(V.cb_log_prob(np.array([u]), np.array([l])))), 0.0, 1.0,
                   epsabs=0, epsrel=1e-13)
    assert abs(mass - 1.0) < 1e-10


def test_bounds_against_the_integrated_likelihood():
    # A VAE with one latent: log p(u) = log int p(u | z) N(z; 0, 1) dz by the trapezoid rule on
    # [-12, 12] (4,001 points; the integrand is smooth, the tails beyond 12 weigh < e^-72).
    # Then ELBO (4,000 draws) < log p(u), E[IWAE_1] = ELBO (within 5 standard errors), IWAE_K
    # rises with K, and IWAE_1000 is within 5 % of the gap log p - ELBO of log p (Burda et
    # al. 2016, thm. 1: IWAE_K -> log p(u)).
    model = VAE(hidden=(8,), latent=1, dtype=np.float64, seed=2)
    u = np.random.default_rng(0).uniform(0, 1, (3, 784))
    z = np.linspace(-12, 12, 4001)
    logits, _ = model.decode(z[:, None])
    lp = np.stack([V.cb_log_prob(ui, logits) for ui in u])                  # (3, 4001)
    log_prior = -0.5 * z * z - 0.5 * math.log(2 * math.pi)
    w = np.full(z.shape, z[1] - z[0])
    w[[0, -1]] /= 2
    logp = logsumexp(lp + log_prior + np.log(w), axis=1)
    rng = np.random.default_rng(1)
    elbo = V.elbo(model, u, rng, samples=4000)
    gap = logp - elbo
    assert np.all(gap > 0)
    one = np.stack([V.iwae(model, u, rng, 1) for _ in range(2000)])       # IWAE_1 draws: the ELBO's integrand
    se = one.std(axis=0) / math.sqrt(len(one))
    assert np.all(np.abs(one.mean(axis=0) - elbo) < 5 * se)               # E[IWAE_1] = ELBO, within 5 SE
    k10 = np.stack([V.iwae(model, u, rng, 10) for _ in range(200)])
    k1000 = np.stack([V.iwae(model, u, rng, 1000) for _ in range(4)])
    assert np.all(one.mean(axis=0) < k10.mean(axis=0)) and np.all(k10.mean(axis=0) < k1000.mean(axis=0))
    assert np.all(np.abs(logp - k1000.mean(axis=0)) < 0.05 * gap), (logp, k1000.mean(axis=0), gap)


def test_bits_per_dim_convention():
    # A decoder with logits 0 (lam = 1/2, C = 2) is the uniform density on [0, 1]: p(u | z) = 1,
    # log p(u) = 0 for every u, so every bound is 0 and bits/dim is exactly 8.
    model = VAE(hidden=(4,), latent=2, dtype=np.float64, seed=0)
    for k in model.params:
        if k.startswith("dec."):
            model.params[k][...] = 0.0
        if k.startswith("logvar."):
            model.params[k][...] = 0.0           # q = N(mu, I) with mu from the encoder: KL > 0 unless mu = 0
        if k.startswith("mu."):
            model.params[k][...] = 0.0
    pixels = np.random.default_rng(0).integers(0, 256, (5, 1, 28, 28))
    res = V.vae_bits_per_dim(model, pixels, np.random.default_rng(1), samples=2, k=5, batch=2)
    np.testing.assert_allclose(res["elbo_bpd"], 8.0, rtol=0, atol=1e-12)
    np.testing.assert_allclose(res["iwae_bpd"], 8.0, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="pixels"):
        V.vae_bits_per_dim(model, pixels[:, :, :10], np.random.default_rng(1))


def test_softplus_is_log_one_plus_exp_without_overflow():
    # against numpy's logaddexp(0, l) over the float64 range, and the asymptotes by hand
    l = np.concatenate([np.linspace(-50, 50, 201), [-800.0, -1e300, 800.0, 1e300, 0.0]])
    np.testing.assert_allclose(V.softplus(l), np.logaddexp(0.0, l), rtol=1e-15, atol=0)
    assert V.softplus(0.0) == math.log(2.0)
    assert V.softplus(800.0) == 800.0 and V.softplus(-800.0) == 0.0
