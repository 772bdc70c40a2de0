"""The fast samplers' building blocks by value (refdiff/solvers.py): EDM's sigma grid, the
time of a given noise level, Tweedie's data prediction, and a checkpoint's continuous SDE."""
import math

import numpy as np
import pytest

from refdiff import solvers
from refdiff.sde import VP


def test_edm_sigmas_is_karras_eq5_as_diffusers_writes_it():
    smin, smax, N, rho = 0.002, 80.0, 18, 7.0
    ramp = np.linspace(0, 1, N)                    # diffusers' _convert_to_karras, written out
    expected = (smax ** (1 / rho) + ramp * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho
    s = solvers.edm_sigmas(smin, smax, N, rho)
    assert s.shape == (N + 1,) and s[-1] == 0.0
    np.testing.assert_allclose(s[:-1], expected, rtol=1e-14)
    assert math.isclose(s[0], smax, rel_tol=1e-14) and math.isclose(s[N - 1], smin, rel_tol=1e-12)
    assert np.all(np.diff(s) < 0)


def test_t_of_sigma_inverts_the_vp_noise_level_in_closed_form():
    """VP: sigma(t)^2 = std_t^2 / gamma_t^2 = exp(B(t)) - 1 with B(t) = b0 t + (b1 - b0) t^2 / 2,
    so t solves (b1 - b0)/2 t^2 + b0 t - log(1 + sigma^2) = 0."""
    sde = VP(0.1, 20.0)
    a, b = (sde.beta_max - sde.beta_min) / 2, sde.beta_min
    for sigma in (1e-3, 0.1, 1.0, 10.0, 100.0):
        c = -math.log1p(sigma ** 2)
        t = (-b + math.sqrt(b * b - 4 * a * c)) / (2 * a)
        assert math.isclose(solvers.t_of_sigma(sde, sigma), t, rel_tol=1e-10)
    big = math.sqrt(math.expm1(sde.beta_min + (sde.beta_max - sde.beta_min) / 2))    # sigma(T)
    assert solvers.t_of_sigma(sde, 2 * big) == sde.T


def test_data_prediction_is_tweedie_on_gaussian_data():
    """x0 ~ N(0, s0^2 I): x_t = gamma x0 + std z has score -x / (gamma^2 s0^2 + std^2) and
    E[x0 | x_t] = gamma s0^2 x / (gamma^2 s0^2 + std^2)."""
    sde, s0, t = VP(), 0.7, 0.3
    gamma, std = (float(v) for v in sde.marginal_coeffs(np.float64(t)))
    var = gamma ** 2 * s0 ** 2 + std ** 2
    x = np.random.default_rng(0).standard_normal((5, 3))
    got = solvers.data_prediction(sde, lambda x, t: -x / var, x, t)
    np.testing.assert_allclose(got, gamma * s0 ** 2 * x / var, rtol=1e-13)


def test_continuous_sde_of_a_checkpoint():
    sde = solvers.continuous_sde({"ddpm_schedule": dict(num_steps=1000, beta_start=1e-4, beta_end=0.02)}, "x")
    assert isinstance(sde, VP) and math.isclose(sde.beta_min, 0.1) and math.isclose(sde.beta_max, 20.0)
    with pytest.raises(ValueError, match="the edm sampler needs a continuous-time model"):
        solvers.continuous_sde({"ddpm_schedule": dict(num_steps=1000, kind="cosine")}, "the edm sampler")
