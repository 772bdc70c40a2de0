"""Properties every SDE must have (refdiff.sde)."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refdiff import metrics, samplers
from refdiff.data import GaussianMixture
from refdiff.sde import OU, VE, VP, DDPMSchedule, SubVP, bcast, make_sde
from tests.helpers import EPS64, FD_ROUND, FD_RTOL, TOL, assert_close, examples

SDES = [OU(5.0), OU(2.0, sigma=1.5, T=2.0), VP(), SubVP(), VE(0.01, 4.0)]
IDS = [repr(s) for s in SDES]


@pytest.mark.parametrize("sde", SDES, ids=IDS)
@settings(max_examples=examples(20), deadline=None)
@given(u=st.floats(0.01, 0.99))
def test_marginal_solves_the_moment_odes(sde, u):
    """For dX = -a(t) X dt + g dW: d gamma/dt = -a gamma and d var/dt = -2 a var + g^2."""
    t, h = u * sde.T, 1e-6 * sde.T
    (g1, s1), (g0, s0) = sde.marginal_coeffs(t + h), sde.marginal_coeffs(t - h)
    gamma, std = sde.marginal_coeffs(t)
    a, g = sde.a(t), sde.diffusion(t)
    # central differences: truncation O(h^2) (inside FD_RTOL relative) plus the rounding of the
    # two evaluations, FD_ROUND ulps of the larger, divided by 2h (tests/helpers.py's bound)
    def near(fd, exact, f1, f0):
        return abs(fd - exact) <= FD_RTOL * abs(exact) + FD_ROUND * EPS64 * max(abs(f1), abs(f0)) / h
    assert near((g1 - g0) / (2 * h), -a * gamma, g1, g0)
    assert near((s1 ** 2 - s0 ** 2) / (2 * h), -2 * a * std ** 2 + g ** 2, s1 ** 2, s0 ** 2)


@pytest.mark.parametrize("sde", SDES, ids=IDS)
def test_forward_em_matches_marginal(sde):
    rng = np.random.default_rng(0)
    x0 = np.tile(np.array([[1.5, -0.5]]), (20000, 1))
    t_end = 0.6 * sde.T
    x = samplers.forward_simulate(sde, x0, 400, rng, t_end=t_end)
    mean, std = sde.marginal(x0[:1], t_end)
    # Monte-Carlo standard errors: std/sqrt(N) for the mean, std/sqrt(2N) for the std;
    # plus the EM discretisation bias O(dt) (dt = 1.5e-3 T): 5 standard errors + 1 % bias.
    se = float(std.ravel()[0]) / np.sqrt(len(x))
    assert np.all(np.abs(x.mean(0) - mean[0]) < 5 * se + 0.01 * np.abs(mean[0]))
    assert np.all(np.abs(x.std(0) - std.ravel()[0]) < 5 * se / np.sqrt(2) * 1.5 + 0.01 * std.ravel()[0])


@pytest.mark.parametrize("sde", SDES, ids=IDS)
def test_prior_is_reached_at_T(sde):
    """KL(p_{T|0}(.|x0) || prior) is small for unit-scale data (|x0| = 1, D = 2).

    KL(N(m, s^2 I) || N(0, p^2 I)) = 1/2 [D (s^2/p^2 - 1 - ln(s^2/p^2)) + |m|^2 / p^2].
    0.05 nats: VE with sigma_max = 4 sits at 0.03 (its mean never decays); a sign error
    in a marginal or a wrong prior std gives O(1).
    """
    x0 = np.array([[0.6, -0.8]])
    mean, std = sde.marginal(x0, sde.T)
    r = (float(std.ravel()[0]) / sde.prior_std()) ** 2
    kl = 0.5 * (2 * (r - 1 - np.log(r)) + np.sum(mean ** 2) / sde.prior_std() ** 2)
    assert kl < 0.05, f"KL(p_T|0 || prior) = {kl:.3g}"


@pytest.mark.parametrize("sde", SDES[:1] + SDES[2:], ids=IDS[:1] + IDS[2:])
def test_reverse_sampling_with_exact_score_returns_the_mixture(sde):
    gmm = GaussianMixture.default()
    rng = np.random.default_rng(1)
    n = 4000
    x = samplers.euler_maruyama(sde, lambda x, t: gmm.score(x, t, sde), (n, 2), 1000, rng)
    real = gmm.sample(n, rng)
    sw = metrics.sliced_wasserstein(x, real, 128, np.random.default_rng(2))
    floor = np.mean([metrics.sliced_wasserstein(gmm.sample(n, rng), gmm.sample(n, rng), 128,
                                                np.random.default_rng(2)) for _ in range(4)])
    # A wrong drift sign, a missing g^2 or a wrong prior give ratios of 10 or more.
    assert sw < 1.5 * floor, f"sliced W1 {sw:.4f} vs real-vs-real floor {floor:.4f}"


def test_prior_logp_is_the_gaussian_density():
    sde = VE(0.01, 3.0)
    z = np.array([[0.0, 0.0], [3.0, -3.0]])
    expected = -np.log(2 * np.pi * 9.0) - 0.5 * np.sum(z ** 2, 1) / 9.0
    assert np.allclose(sde.prior_logp(z), expected)


def test_reverse_drift_is_f_minus_g2_score():
    sde = VP()
    rng = np.random.default_rng(0)
    x, s, t = rng.standard_normal((3, 4)), rng.standard_normal((3, 4)), np.array([0.1, 0.5, 0.9])
    g = sde.diffusion(t)[:, None]
    assert np.allclose(sde.reverse_drift(x, t, s), sde.drift(x, t) - g ** 2 * s)


def test_bcast_any_rank():
    t = np.arange(3.0)
    assert bcast(t, np.zeros((3, 2))).shape == (3, 1)
    assert bcast(t, np.zeros((3, 1, 4, 4))).shape == (3, 1, 1, 1)
    assert bcast(0.5, np.zeros((3, 2))).shape == ()


def test_ddpm_schedule_linear_values():
    s = DDPMSchedule()
    assert s.betas[0] == pytest.approx(1e-4) and s.betas[-1] == pytest.approx(0.02)
    assert np.allclose(s.alpha_bars, np.cumprod(1 - s.betas))
    c = DDPMSchedule(kind="cosine")
    assert np.all(np.diff(c.alpha_bars) < 0) and c.alpha_bars[-1] < 1e-3


def betas_for_alpha_bar(num_steps, max_beta=0.999):
    """diffusers' betas_for_alpha_bar (scheduling_ddpm.py), written out independently:
    beta_i = min(1 - abar((i+1)/N) / abar(i/N), max_beta), abar(t) = cos((t + 0.008)/1.008 pi/2)^2
    (Nichol & Dhariwal 2021, eq. 17 and the clip at 0.999 below it)."""
    import math
    abar = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    return np.array([min(1 - abar((i + 1) / num_steps) / abar(i / num_steps), max_beta) for i in range(num_steps)])


@pytest.mark.parametrize("num_steps", [1000, 50, 7])
def test_ddpm_schedule_cosine_values(num_steps):
    """Every beta of the cosine chain equals Nichol & Dhariwal's formula (diffusers'
    betas_for_alpha_bar), the last one clipped at 0.999 exactly; float64, the same
    operations in another order: a few ulps, TOL[float64]."""
    c = DDPMSchedule(num_steps=num_steps, kind="cosine")
    want = betas_for_alpha_bar(num_steps)
    assert_close(c.betas, want, name="betas", **TOL[np.dtype(np.float64)])
    assert c.betas[-1] == 0.999 and want[-1] == 0.999      # abar(1) = cos(pi/2)^2 ~ 0: beta -> 1, clipped
    assert_close(c.alpha_bars, np.cumprod(1 - want), name="alpha_bars", **TOL[np.dtype(np.float64)])


def test_vp_is_the_continuous_limit_of_ddpm():
    """alpha_bar_i of the linear chain = gamma_t^2 of VP(0.1, 20) at t = (i+1)/N, to O(1/N)."""
    s, vp = DDPMSchedule(), VP(0.1, 20.0)
    t = (np.arange(1000) + 1) / 1000
    gamma, _ = vp.marginal_coeffs(t)
    assert np.max(np.abs(s.alpha_bars - gamma ** 2)) < 5e-3


# --- configuration, defaults, overflow guards --------------------------------------------------------
@pytest.mark.parametrize("make, config, text", [      # built inside the test: construction is under test
    (lambda: OU(2.0), {"name": "ou", "beta": 2.0, "sigma": 2.0, "T": 1.0}, "OU(beta=2.0, sigma=2.0, T=1.0)"),
    (lambda: VP(), {"name": "vp", "beta_min": 0.1, "beta_max": 20.0, "T": 1.0}, "VP(beta_min=0.1, beta_max=20.0, T=1.0)"),
    (lambda: SubVP(0.2, 10.0, T=2.0), {"name": "subvp", "beta_min": 0.2, "beta_max": 10.0, "T": 2.0},
     "SubVP(beta_min=0.2, beta_max=10.0, T=2.0)"),
    (lambda: VE(), {"name": "ve", "sigma_min": 0.01, "sigma_max": 5.0, "T": 1.0}, "VE(sigma_min=0.01, sigma_max=5.0, T=1.0)"),
], ids=["ou", "vp", "subvp", "ve"])
def test_config_repr_and_defaults(make, config, text):
    """config() is what checkpoints record and make_sde rebuilds from (exact keys and the
    documented defaults: OU's sigma = sqrt(2 beta), stationary N(0, 1); VP(0.1, 20); VE(0.01, 5));
    repr names the class and every parameter."""
    sde = make()
    assert sde.config() == config
    assert repr(sde) == text
    again = make_sde(**config)
    assert type(again) is type(sde) and again.config() == config
    assert len(VP().discrete_betas()) == 1000 and VP().discrete_betas()[-1] == pytest.approx(0.02)
    s = DDPMSchedule(50, kind="cosine")
    assert s.config() == {"num_steps": 50, "beta_start": 1e-4, "beta_end": 0.02, "kind": "cosine"}


def test_overflow_guards_reject_only_what_overflows():
    """Each guard refuses parameters whose derived constants overflow float64 and accepts
    those just inside (the guards' constants are checked at their edge, not 10x away)."""
    big = np.finfo(np.float64).max
    with pytest.raises(ValueError, match="too large"):
        OU(0.6 * big, sigma=1.0)                        # 2 beta overflows
    OU(0.4 * big, sigma=1.0)                            # 2 beta fits (3 beta would not)
    with pytest.raises(ValueError, match="too large"):
        OU(1.0, sigma=1.5e154)                          # sigma^2 overflows
    OU(1.0, sigma=1e154)                                # sigma^2 = 1e308 fits; sigma^2 / 2 beta too
    with pytest.raises(ValueError, match="too large"):
        OU(0.25, sigma=1e154)                           # sigma^2 / (2 beta) = 2e308 overflows
    OU(0.75, sigma=1e154)                               # / (2 beta) fits, / (3 beta) or x (2 beta) would not
    with pytest.raises(ValueError):
        VE(1e-300, 1e10)                                # sigma_max / sigma_min = 1e310 overflows
    VE(1e-290, 1e10)                                    # ratio 1e300 fits; ratio sigma_max^2 would not
    with pytest.raises(ValueError):
        VE(1.0, 1.5e154)                                # sigma_max^2 overflows
    with pytest.raises(ValueError):
        VE(1.0, 1e153)                                  # g(T)^2 = 2 log(1e153) 1e306 overflows
    VE(1.0, 1e152)                                      # g(T)^2 = 7e306 fits
