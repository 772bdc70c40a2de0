"""Reverse-time samplers for the continuous SDEs (reference).

All take `score_fn(x, t) -> score` (any callable: a trained model wrapped by
`losses.score_fn_from_model`, or an exact score such as `GaussianMixture.score`), start
from fresh prior noise `sde.prior_sample` (never from the forward end-point of the data,
the mistake in the report's code), and integrate from T down to the time floor `t_min`
on a grid of N + 1 times (`time_grid`: "uniform" or "squared"). The last step adds no
noise (score_sde's `noise_removal`).

A score that is NaN or Inf stops sampling with a FloatingPointError naming the step and
the time (a diverged model would otherwise return NaN images without a word).

Registered by name in SAMPLERS, each as `(sde, score_fn, shape, steps, rng) -> x`.
"""
from __future__ import annotations

import numpy as np

from ._checks import check_array_float, check_finite_state, check_int, check_real, check_rng

SPACINGS = ("uniform", "squared")


def time_grid(sde, steps, t_min, spacing="uniform"):
    """Times T = t_0 > t_1 > ... > t_N = t_min, N = steps:

        "uniform"  t_k = t_min + (T - t_min)(1 - k/N)       equal steps
        "squared"  t_k = t_min + (T - t_min)(1 - k/N)^2     steps shrinking linearly to 0 near
                   t_min, where the score changes fastest; needed when std_t grows fast
                   from 0 (OU, VE). (DDIM's "quadratic" skip, refdiff.ddpm.ddim_timesteps, is
                   another formula, on the discrete chain.)
    """
    steps = check_int(steps, "steps", lo=1)
    t_min = check_real(t_min, "t_min", lo=0, hi=sde.T, lo_open=True, hi_open=True)
    if spacing not in SPACINGS:
        raise ValueError(f"spacing must be one of {SPACINGS}; got {spacing!r}")
    u = np.linspace(1.0, 0.0, steps + 1)
    return t_min + (sde.T - t_min) * (u if spacing == "uniform" else u * u)


def _score(score_fn, x, t, step):
    # a finite but huge score can overflow the state: stop here, naming the step, rather than let
    # the model refuse a non-finite input as if the caller had passed it
    check_finite_state(np.all(np.isfinite(x)), "the state", step, t)
    s = np.asarray(score_fn(x, np.full(x.shape[0], t)))
    if s.shape != x.shape:
        raise ValueError(f"score_fn returned shape {s.shape}; expected {x.shape}")
    if s.dtype.kind not in "iuf":
        raise TypeError(f"score_fn returned an array of dtype {s.dtype}; expected real numbers")
    check_finite_state(np.all(np.isfinite(s)), "the score", step, t)
    return s


def _start(sde, shape, rng):
    check_rng(rng)
    shape = tuple(shape)
    for s in shape:
        check_int(s, "shape entries", lo=1)
    return sde.prior_sample(shape, rng)


def euler_maruyama(sde, score_fn, shape, steps, rng, t_min=1e-5, spacing="squared", return_trajectory=False):
    """Reverse-time Euler-Maruyama (report §1.3 applied to eq. 2.6):

        x <- x - [f(x, t) - g(t)^2 s(x, t)] h + g(t) sqrt(h) z,   h = t_k - t_{k+1} > 0.

    Returns x (shape) or (x, trajectory (N+1, *shape)).
    """
    ts = time_grid(sde, steps, t_min, spacing)
    x = _start(sde, shape, rng)
    traj = [x.copy()] if return_trajectory else None
    for k in range(steps):
        t, h = ts[k], ts[k] - ts[k + 1]
        drift = sde.reverse_drift(x, t, _score(score_fn, x, t, k))
        x = x - drift * h
        if k < steps - 1:
            x = x + sde.diffusion(t) * np.sqrt(h) * rng.standard_normal(x.shape)
        if return_trajectory:
            traj.append(x.copy())
    check_finite_state(np.all(np.isfinite(x)), "the state", steps, ts[-1])
    return (x, np.stack(traj)) if return_trajectory else x


def langevin_alpha(sde, t, discrete_steps=1000):
    """score_sde's alpha_i for the Langevin corrector (Song et al. 2021, Alg. 5; their
    `LangevinCorrector`): for VP and sub-VP, alpha_i = 1 - beta_i of the discretised chain
    beta_i = linspace(beta_min/N, beta_max/N, N)[i], i = int(t (N - 1) / T), N = discrete_steps
    (score_sde's VPSDE; its subVPSDE has no `alphas` and its branch fails, so sub-VP takes
    the same beta(t)'s chain here); 1 for VE (and for OU, which score_sde does not have)."""
    if not hasattr(sde, "discrete_betas"):
        return 1.0
    N = check_int(discrete_steps, "discrete_steps", lo=1)
    i = int(t * (N - 1) / sde.T)
    return 1.0 - float(sde.discrete_betas(N)[i])


def predictor_corrector(sde, score_fn, shape, steps, rng, t_min=1e-5, spacing="squared", snr=0.16, n_corrector=1,
                        discrete_steps=1000):
    """Euler-Maruyama predictor + Langevin corrector (Song et al. 2021, Alg. 2-3 and 5),
    the corrector exactly as score_sde's `LangevinCorrector`.

    At each time t the corrector runs `n_corrector` Langevin steps

        x <- x + e s + sqrt(2 e) z,   e = 2 alpha_i (snr mean_b||z_b|| / mean_b||s_b||)^2,

    with the norms per sample averaged over the batch, as score_sde (a per-sample ratio
    explodes in low dimension where ||s|| can be ~0; a zero score gives e = 0 here instead of
    score_sde's division by zero), and alpha_i from `langevin_alpha` (1 - beta_i for VP and
    sub-VP with N = discrete_steps, 1 for VE). snr >= 0 (0: no correction), n_corrector >= 0.
    """
    snr = check_real(snr, "snr", lo=0)
    n_corrector = check_int(n_corrector, "n_corrector", lo=0)
    ts = time_grid(sde, steps, t_min, spacing)
    x = _start(sde, shape, rng)
    axes = tuple(range(1, x.ndim))
    for k in range(steps):
        t = ts[k]
        alpha = langevin_alpha(sde, t, discrete_steps)
        for _ in range(n_corrector):
            s = _score(score_fn, x, t, k)
            z = rng.standard_normal(x.shape)
            z_norm = np.mean(np.sqrt(np.sum(z * z, axis=axes)))
            s_norm = max(np.mean(np.sqrt(np.sum(s * s, axis=axes))), 1e-12)
            e = 2 * alpha * (snr * z_norm / s_norm) ** 2
            x = x + e * s + np.sqrt(2 * e) * z
        h = t - ts[k + 1]
        x = x - sde.reverse_drift(x, t, _score(score_fn, x, t, k)) * h
        if k < steps - 1:
            x = x + sde.diffusion(t) * np.sqrt(h) * rng.standard_normal(x.shape)
    check_finite_state(np.all(np.isfinite(x)), "the state", steps, ts[-1])
    return x


def probability_flow_heun(sde, score_fn, shape, steps, rng, t_min=1e-5, spacing="squared"):
    """Deterministic sampling with the probability-flow ODE dx/dt = f - g^2/2 s
    (Song et al. 2021 eq. 13), Heun's method (2nd order; Karras et al. 2022 Alg. 1).
    The only randomness is the prior draw."""
    ts = time_grid(sde, steps, t_min, spacing)
    x = _start(sde, shape, rng)
    for k in range(steps):
        t0, t1 = ts[k], ts[k + 1]
        d0 = sde.probability_flow_drift(x, t0, _score(score_fn, x, t0, k))
        x_euler = x + d0 * (t1 - t0)
        d1 = sde.probability_flow_drift(x_euler, t1, _score(score_fn, x_euler, t1, k))
        x = x + 0.5 * (d0 + d1) * (t1 - t0)
    check_finite_state(np.all(np.isfinite(x)), "the state", steps, ts[-1])
    return x


def forward_simulate(sde, x0, steps, rng, t_end=None, return_trajectory=False):
    """Euler-Maruyama on the forward SDE from x0 at t = 0 to t_end (default T)."""
    t_end = sde.T if t_end is None else t_end
    steps = check_int(steps, "steps", lo=1)
    check_rng(rng)
    x = check_array_float(x0, "x0").copy()
    sde.check_t(t_end)
    ts = np.linspace(0.0, t_end, steps + 1)
    traj = [x.copy()] if return_trajectory else None
    for k in range(steps):
        h = ts[k + 1] - ts[k]
        x = x + sde.drift(x, ts[k]) * h + sde.diffusion(ts[k]) * np.sqrt(h) * rng.standard_normal(x.shape)
        if return_trajectory:
            traj.append(x.copy())
    return (x, np.stack(traj)) if return_trajectory else x


SAMPLERS = {"em": euler_maruyama, "pc": predictor_corrector, "ode": probability_flow_heun}

# refdiff.solvers' samplers, same signature (it imports this module late, so no cycle)
from .solvers import dpm_solver_pp, edm_sampler, reverse_heun  # noqa: E402

SAMPLERS.update({"dpm2m": dpm_solver_pp, "edm": edm_sampler, "heun-sde": reverse_heun})
