"""The SDEs by value where the other tests do not look: the horizon T at T != 1 (they use
T = 1, where t / T and t * T agree).

VE: sigma(t) = sigma_min (sigma_max / sigma_min)^(t / T), so VE on [0, T] is VE on [0, 1] run on
the clock s = t / T: if Y solves the T = 1 equation, X(t) = Y(t / T) has
    a_T(t) = a_1(t / T) / T (both 0),  g_T(t)^2 = g_1(t / T)^2 / T,  marginal_coeffs_T(t) = marginal_coeffs_1(t / T).
VP and sub-VP: beta(t) = beta_min + (t / T)(beta_max - beta_min), the same beta values spread over
[0, T] (not a clock change: int_0^T beta = T (beta_min + beta_max) / 2 grows with T), so
    a_T(t) = a_1(t / T),  g_T(t)^2 from beta_T(t) = beta_1(t / T),  log gamma_T(t) = T log gamma_1(t / T).
Then VE's marginal std in closed form, OU's drift rate, and the drift's dtype.
"""
import math

import numpy as np
import pytest

from refdiff.sde import OU, VE, VP, SubVP
from tests.helpers import assert_fd, fd_tangent

S = np.linspace(0.0, 1.0, 11)


@pytest.mark.parametrize("T", [0.25, 2.0, 7.0])
def test_ve_horizon_is_a_clock_change(T):
    long, unit = VE(0.01, 5.0, T=T), VE(0.01, 5.0)
    t = T * S
    np.testing.assert_allclose(long.sigma(t), unit.sigma(S), rtol=1e-12)
    np.testing.assert_allclose(long.diffusion(t) ** 2, unit.diffusion(S) ** 2 / T, rtol=1e-12)
    for got, want in zip(long.marginal_coeffs(t), unit.marginal_coeffs(S)):
        np.testing.assert_allclose(got, want, rtol=1e-12)
    assert long.prior_std() == pytest.approx(unit.prior_std(), rel=1e-12)


@pytest.mark.parametrize("cls", [VP, SubVP])
@pytest.mark.parametrize("T", [0.25, 2.0, 7.0])
def test_linear_beta_is_spread_over_the_horizon(cls, T):
    long, unit = cls(0.1, 20.0, T=T), cls(0.1, 20.0)
    t = T * S
    np.testing.assert_allclose(long.beta(t), unit.beta(S), rtol=1e-12)
    np.testing.assert_allclose(long.a(t), unit.a(S), rtol=1e-12)
    np.testing.assert_allclose(long.log_gamma(t), T * unit.log_gamma(S), rtol=1e-12, atol=0)
    # the marginal from log gamma: VP std^2 = 1 - gamma^2, sub-VP std = 1 - gamma^2
    gamma, std = long.marginal_coeffs(t)
    g = np.exp(T * unit.log_gamma(S))
    np.testing.assert_allclose(gamma, g, rtol=1e-12)
    np.testing.assert_allclose(std, np.sqrt(1 - g * g) if cls is VP else 1 - g * g, rtol=1e-10, atol=1e-15)
    g2 = unit.beta(S) if cls is VP else unit.beta(S) * (1 - g ** 4)
    np.testing.assert_allclose(long.diffusion(t) ** 2, g2, rtol=1e-10, atol=1e-15)


@pytest.mark.parametrize("T", [0.25, 2.0])
def test_beta_and_sigma_at_the_ends_of_the_horizon(T):
    vp, ve = VP(0.1, 20.0, T=T), VE(0.01, 5.0, T=T)
    np.testing.assert_allclose(vp.beta(np.array([0.0, T / 2, T])), [0.1, 10.05, 20.0], rtol=1e-12)
    np.testing.assert_allclose(ve.sigma(np.array([0.0, T])), [0.01, 5.0], rtol=1e-12)
    # log gamma(T) = -(1/2) * integral of beta over [0, T] = -(1/2) T (beta_min + beta_max) / 2
    assert float(vp.log_gamma(T)) == pytest.approx(-0.25 * T * 20.1, rel=1e-12)


def test_ve_has_no_drift():
    t = np.array([0.0, 0.3, 1.0])
    a = VE(0.01, 5.0).a(t)
    assert a.shape == t.shape and a.dtype == np.float64 and not np.any(a)
    x = np.ones((3, 2))
    np.testing.assert_array_equal(VE(0.01, 5.0).drift(x, t), np.zeros_like(x))


@pytest.mark.parametrize("T", [1.0, 2.0])
def test_ve_marginal_std_closed_form(T):
    """p_{t|0} = N(x0, (sigma(t)^2 - sigma_min^2) I): 0 at t = 0, and d std^2 / dt = g(t)^2
    (VE has no drift), checked by central differences."""
    ve = VE(0.01, 5.0, T=T)
    gamma, std = ve.marginal_coeffs(np.array([0.0, T]))
    np.testing.assert_array_equal(gamma, [1.0, 1.0])
    np.testing.assert_allclose(std, [0.0, math.sqrt(5.0 ** 2 - 0.01 ** 2)], rtol=1e-12, atol=0)
    t = np.linspace(0.1, 0.9, 5) * T
    var = lambda t: ve.marginal_coeffs(t)[1] ** 2      # noqa: E731
    assert_fd(ve.diffusion(t) ** 2, fd_tangent(var, t, np.ones_like(t)), "d std^2 / dt")


def test_ou_drift_rate_has_the_shape_of_t():
    t = np.array([0.0, 0.5, 1.0])
    a = OU(5.0).a(t)
    assert a.shape == t.shape and a.dtype == np.float64
    np.testing.assert_array_equal(a, [5.0, 5.0, 5.0])


@pytest.mark.parametrize("sde", [VP(0.1, 20.0), VE(0.01, 5.0), OU(5.0)])
def test_drift_keeps_float32(sde):
    """bcast casts t to a floating x's dtype: a float32 state keeps float32 through the drift."""
    x = np.ones((4, 3), dtype=np.float32)
    t = np.full(4, 0.5)
    assert sde.drift(x, t).dtype == np.float32
    assert sde.drift(x.astype(np.float64), t).dtype == np.float64


@pytest.mark.parametrize("sde, want", [(OU(0.5), 0.5), (VE(0.01, 5.0), 0.0), (VP(0.1, 20.0), 0.5 * 20.0)])
def test_drift_rate_at_integer_times_is_float(sde, want):
    """Integer times (t = 1, or an int array) give the float rate: OU's 0.5 is not truncated to 0."""
    for t in (1, np.array([1, 1])):
        a = sde.a(t)
        assert a.dtype == np.float64
        np.testing.assert_array_equal(a, np.full(np.shape(t), want))
