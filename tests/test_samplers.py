"""The probability-flow ODE and the samplers on Gaussian data, where everything is closed form.

Data x0 ~ N(0, s^2 I). Every SDE here has p_{t|0}(x | x0) = N(gamma_t x0, std_t^2 I), so
p_t = N(0, v_t I) with v_t = gamma_t^2 s^2 + std_t^2 and the exact score is -x / v_t.

- The probability-flow ODE (Song et al. 2021, eq. 13) dx/dt = f - g^2/2 score moves
  x_t = sqrt(v_t / v_T) x_T (each sample is rescaled: the marginals are Gaussians of one
  family), so its drift at (x, t) is x v'(t) / (2 v(t)), and `probability_flow_heun`
  maps a prior draw x_T to x_T sqrt(v_tmin / v_T), up to Heun's O(N^-2) error.
- The reverse SDE samplers (Euler-Maruyama, predictor-corrector) must draw from N(0, v_tmin)
  at the end: checked on the sample variance, with a tolerance from its sampling error.
"""
import numpy as np
import pytest

from refdiff import samplers
from refdiff.sde import OU, VE, VP, DDPMSchedule, SubVP

SDES = [VP(), SubVP(), VE(0.01, 5.0), OU(2.0, sigma=1.5, T=2.0)]
S2 = 0.25                                     # data variance s^2


def variance(sde, t):
    gamma, std = sde.marginal_coeffs(np.asarray(t, dtype=np.float64))
    return gamma ** 2 * S2 + std ** 2


def exact_score(sde):
    return lambda x, t: -x / variance(sde, t).reshape((-1,) + (1,) * (x.ndim - 1))


@pytest.mark.parametrize("sde", SDES, ids=repr)
def test_probability_flow_drift_is_the_gaussian_rescaling(sde):
    """f - g^2/2 score == x v'(t) / 2 v(t); v' by central differences with step 1e-5: the
    truncation h^2 v'''/6 and rounding u v / h are below 1e-9 of v' for these smooth v."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 3))
    for t in [0.05, 0.3, 0.7 * sde.T, sde.T]:
        h = 1e-5
        dv = (variance(sde, min(t + h, sde.T)) - variance(sde, t - h)) / (min(t + h, sde.T) - (t - h))
        want = x * dv / (2 * variance(sde, t))
        got = sde.probability_flow_drift(x, t, exact_score(sde)(x, np.full(5, t)))
        np.testing.assert_allclose(got, want, rtol=1e-6 if t < sde.T else 1e-4, atol=0)   # one-sided at T: O(h)


@pytest.mark.parametrize("sde", SDES[:3], ids=repr)
def test_probability_flow_heun_maps_prior_to_data(sde):
    """x_tmin = x_T sqrt(v_tmin / v_T) for each sample; the error falls 4x per doubling of
    the steps (second order), and is below 1e-3 of the sample at 200 steps (VE's std grows
    fastest near 0, where the uniform grid is coarsest)."""
    shape, t_min = (64, 2), 1e-3
    x_T = sde.prior_sample(shape, np.random.default_rng(5))
    want = x_T * np.sqrt(variance(sde, t_min) / variance(sde, sde.T))
    errs = []
    for steps in (100, 200):
        got = samplers.probability_flow_heun(sde, exact_score(sde), shape, steps, np.random.default_rng(5),
                                             t_min=t_min, spacing="uniform")
        errs.append(np.max(np.abs(got - want)) / np.max(np.abs(want)))
    assert errs[1] < 1e-3, errs
    assert 3.0 < errs[0] / errs[1] < 5.0, f"Heun should be second order: errors {errs}"


@pytest.mark.parametrize("sampler", ["em", "pc"])
@pytest.mark.parametrize("sde", [VP(), VE(0.01, 5.0)], ids=repr)
def test_reverse_samplers_reach_the_data_variance(sampler, sde):
    """Sample variance of n = 20,000 1-D draws vs v_tmin: its standard error is
    v sqrt(2/n) = 1 %; the discretisation bias at 500 steps is below 1 % (measured); 4 % is
    4 standard errors. A corrector whose noise were sqrt(e) instead of sqrt(2 e) drives each
    step towards v/2 and ends ~10-20 % low."""
    n, t_min = 20_000, 1e-3
    kwargs = dict(snr=0.16, n_corrector=1) if sampler == "pc" else {}
    x = samplers.SAMPLERS[sampler](sde, exact_score(sde), (n, 1), 500, np.random.default_rng(1), t_min=t_min,
                                   **kwargs)
    v = variance(sde, t_min)
    assert abs(x.var() / v - 1) < 0.04, f"variance {x.var():.4f} vs exact {v:.4f}"
    assert abs(x.mean()) < 4 * np.sqrt(v / n)


@pytest.mark.parametrize("sampler", ["em", "pc", "pc0", "ode"])          # pc0: no corrector step
def test_divergence_is_named_with_step_and_time(sampler):
    """A score that turns NaN below t = 0.5 stops the sampler saying where: the score at step
    k, t = t_k (Heun meets it one step earlier, at the end point t_k of step k - 1)."""
    sde, steps = VP(), 10
    ts = samplers.time_grid(sde, steps, 1e-3, "uniform")
    k = int(np.argmax(ts < 0.5))
    step = k - 1 if sampler == "ode" else k
    nan_below = lambda x, t: np.where(t[:, None] < 0.5, np.nan, -x)
    kw = dict(n_corrector=0) if sampler == "pc0" else {}
    with pytest.raises(FloatingPointError, match=rf"the score contains NaN or Inf at step {step} \(t = {ts[k]:.6g}\)"):
        samplers.SAMPLERS[sampler[:2] if sampler == "pc0" else sampler](
            sde, nan_below, (3, 2), steps, np.random.default_rng(0), t_min=1e-3, spacing="uniform", **kw)


@pytest.mark.parametrize("sampler, step", [("em", 1), ("pc", 1), ("ode", 0)])
def test_state_overflow_is_named_where_it_happens(sampler, step):
    """A finite but huge score overflows the state in the first update (g(1)^2 s = inf); the
    sampler stops there with FloatingPointError naming the state and the time it reached
    (t_1 = 0.9001: em and pc check it before step 1's score, Heun before its corrector
    evaluation in step 0), before the score function, which like the models refuses a
    non-finite input with ValueError, sees it."""
    def model_like(x, t):
        if not np.all(np.isfinite(x)):
            raise ValueError("x contains NaN or Inf")
        return np.full_like(x, 1e308)
    with pytest.raises(FloatingPointError, match=rf"^the state contains NaN or Inf at step {step} \(t = 0.9001\)"), \
            np.errstate(over="ignore", invalid="ignore"):       # the overflow is the point
        samplers.SAMPLERS[sampler](VP(), model_like, (3, 2), 10, np.random.default_rng(0), t_min=1e-3,
                                   spacing="uniform")


def test_predictor_corrector_defaults():
    """The documented defaults: t_min 1e-5, the squared grid, snr 0.16, one corrector step,
    alpha from a 1,000-step chain."""
    run = lambda **kw: samplers.predictor_corrector(VP(), lambda x, t: -x, (4, 2), 5, np.random.default_rng(1), **kw)
    assert np.array_equal(run(), run(t_min=1e-5, spacing="squared", snr=0.16, n_corrector=1, discrete_steps=1000))


@pytest.mark.parametrize("sampler", ["em", "pc", "ode"])
def test_default_grid_is_squared(sampler):
    """Without `spacing` the samplers use the squared grid (finer near t_min)."""
    sde, score = VE(0.01, 5.0), exact_score(VE(0.01, 5.0))
    run = lambda **kw: samplers.SAMPLERS[sampler](sde, score, (4, 2), 8, np.random.default_rng(5), t_min=1e-3, **kw)
    assert np.array_equal(run(), run(spacing="squared"))
    assert not np.allclose(run(), run(spacing="uniform"))


def _pc_by_hand(sde, score_fn, shape, ts, rng, snr, n_corrector, discrete_steps):
    """score_sde's predictor-corrector written out (Song et al. 2021, Alg. 2 with the
    Langevin corrector of Alg. 5): corrector, then reverse Euler-Maruyama, no noise at the
    last step. Independent of refdiff.samplers except for the SDE's drift and diffusion."""
    x = sde.prior_sample(shape, rng)
    betas = np.linspace(sde.beta_min / discrete_steps, sde.beta_max / discrete_steps, discrete_steps)
    for k in range(len(ts) - 1):
        t = ts[k]
        alpha = 1 - betas[int(t * (discrete_steps - 1) / sde.T)]
        for _ in range(n_corrector):
            s = score_fn(x, np.full(shape[0], t))
            z = rng.standard_normal(shape)
            e = 2 * alpha * (snr * np.linalg.norm(z, axis=1).mean() / max(np.linalg.norm(s, axis=1).mean(), 1e-12)) ** 2
            x = x + e * s + np.sqrt(2 * e) * z
        h = t - ts[k + 1]
        g = sde.diffusion(t)
        x = x - (sde.drift(x, t) - g * g * score_fn(x, np.full(shape[0], t))) * h
        if k < len(ts) - 2:
            x = x + g * np.sqrt(h) * rng.standard_normal(shape)
    return x


@pytest.mark.parametrize("sde", [VP(0.1, 20.0, T=2.0), SubVP(0.2, 10.0)], ids=repr)
def test_predictor_corrector_three_steps_by_hand(sde):
    """Three steps, two corrector steps each, a small score (its batch norm < 1, where the
    1e-12 floor must not act), T = 2 (alpha_i indexes the chain by t (N-1) / T), a
    non-default discrete_steps: the same draws give the same x, float64: TOL[float64]."""
    score = lambda x, t: -1e-3 * x
    shape, steps, t_min = (5, 3), 3, 1e-3
    ts = samplers.time_grid(sde, steps, t_min, "uniform")
    got = samplers.predictor_corrector(sde, score, shape, steps, np.random.default_rng(2), t_min=t_min,
                                       spacing="uniform", snr=0.3, n_corrector=2, discrete_steps=50)
    want = _pc_by_hand(sde, score, shape, ts, np.random.default_rng(2), 0.3, 2, 50)
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12 * np.abs(want).max())


def test_langevin_alpha_scales_time_by_T():
    vp = VP(0.1, 20.0, T=2.0)
    betas = np.linspace(0.1 / 1000, 20.0 / 1000, 1000)
    assert samplers.langevin_alpha(vp, 1.0) == 1 - betas[int(999 / 2)]
    assert samplers.langevin_alpha(vp, 2.0, discrete_steps=1) == 1 - 0.1       # N = 1: the one beta_min / 1


def test_forward_simulate_steps_by_hand():
    """x_{k+1} = x_k + f(x_k, t_k) h + g(t_k) sqrt(h) z_k on t_k = k t_end / N, t_end = T by
    default; the trajectory holds x_0 .. x_N."""
    sde, x0 = OU(2.0, sigma=1.5, T=2.0), np.array([[1.0, -2.0], [0.5, 0.0]])
    x, traj = samplers.forward_simulate(sde, x0, 3, np.random.default_rng(4), return_trajectory=True)
    rng, want = np.random.default_rng(4), [x0]
    ts = np.array([0.0, 2 / 3, 4 / 3, 2.0])
    for k in range(3):
        h = ts[k + 1] - ts[k]
        want.append(want[-1] + sde.drift(want[-1], ts[k]) * h + sde.diffusion(ts[k]) * np.sqrt(h) * rng.standard_normal(x0.shape))
    np.testing.assert_allclose(traj, np.stack(want), rtol=1e-12, atol=1e-14)
    assert np.array_equal(x, traj[-1])
    assert np.array_equal(samplers.forward_simulate(sde, x0, 3, np.random.default_rng(4)), x)
    assert np.array_equal(samplers.forward_simulate(sde, x0, 3, np.random.default_rng(4), t_end=2.0), x)
    one = samplers.forward_simulate(sde, x0, 1, np.random.default_rng(4), t_end=1.0)
    z = np.random.default_rng(4).standard_normal(x0.shape)
    np.testing.assert_allclose(one, x0 + sde.drift(x0, 0.0) + sde.diffusion(0.0) * z, rtol=1e-12)


@pytest.mark.parametrize("call, match", [
    (lambda: samplers.forward_simulate(VP(), np.zeros((2, 2)), 0, np.random.default_rng(0)), "steps"),
    (lambda: samplers.langevin_alpha(VP(), 0.5, discrete_steps=0), "discrete_steps"),
    (lambda: samplers.predictor_corrector(VP(), lambda x, t: -x, (2, 2), 3, np.random.default_rng(0), snr=-0.1), "snr"),
    (lambda: samplers.predictor_corrector(VP(), lambda x, t: -x, (2, 2), 3, np.random.default_rng(0), n_corrector=-1),
     "n_corrector"),
    (lambda: VP().discrete_betas(0), "num_steps"),
    (lambda: DDPMSchedule(beta_start=0.0), "beta_start"),
    (lambda: DDPMSchedule(beta_end=1.0), "beta_end"),
    (lambda: DDPMSchedule(beta_start="a"), "beta_start"),
    (lambda: DDPMSchedule(beta_end="a"), "beta_end"),
])
def test_bad_arguments_are_named(call, match):
    with pytest.raises((ValueError, TypeError), match=rf"\b{match}\b"):
        call()


def test_edge_arguments_are_accepted():
    """The lowest legal values: no corrector step, a constant chain, a one-step chain."""
    x = samplers.predictor_corrector(VP(), lambda x, t: -x, (2, 2), 3, np.random.default_rng(0), n_corrector=0)
    y = samplers.euler_maruyama(VP(), lambda x, t: -x, (2, 2), 3, np.random.default_rng(0))
    assert np.array_equal(x, y)                        # no corrector: PC is Euler-Maruyama
    assert np.array_equal(DDPMSchedule(10, 0.01, 0.01).betas, np.full(10, 0.01))
    assert VP().discrete_betas(1).tolist() == [0.1]
    assert samplers.forward_simulate(VP(), np.zeros((1, 1)), 1, np.random.default_rng(0)).shape == (1, 1)

