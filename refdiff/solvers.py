"""Fast ODE samplers and higher-order SDE solvers for the reverse process (reference).

Every sampler here takes what refdiff.samplers' take, `(sde, score_fn, shape, steps, rng)`
plus keywords, starts from the prior draw `sde.prior_sample(shape, rng)` (or a given
`x_T`), stops at the time floor `t_min`, and returns host float64 arrays. They work for
any linear SDE of refdiff.sde (p_{t|0} = N(gamma_t x0, std_t^2 I)) and any score, learnt
(refdiff.losses.score_fn_from_model) or exact (GaussianMixture.score). Two derived
quantities carry them:

    x0_hat(x, t) = (x + std_t^2 s(x, t)) / gamma_t        Tweedie's formula (Efron 2011):
                                                          E[x0 | x_t = x], the "data prediction"
    lambda_t = log(gamma_t / std_t),  sigma_t = std_t / gamma_t = e^{-lambda_t}

Samplers (NFE = score evaluations for N = `steps`):

    dpm_solver_pp        DPM-Solver++(2M), Lu et al. 2022b, Alg. 2; N NFE. order=1 is DDIM.
    dpm_solver_pp_ddpm   the same on a DDPM chain's own alpha_bars (refdiff.ddpm), DDIM's steps
    edm_sampler          Karras et al. 2022 (EDM) Alg. 2: Heun in sigma on the rho = 7 grid
                         (eq. 5), with the stochastic churn S_churn, S_tmin, S_tmax, S_noise;
                         S_churn = 0 is Alg. 1 (deterministic); 2N - 1 NFE
    rk45_ode             the probability-flow ODE by scipy's adaptive RK45 (Song et al. 2021,
                         §4.3 / score_sde's ode_sampler); the NFE is scipy's nfev
    reverse_heun         the reverse SDE by the stochastic Heun method (Rümelin 1982); 2N NFE.
                         With additive noise (the reverse diffusion SDE) its weak order is 2
                         where Euler-Maruyama's is 1 (both are strong order 1 there; with
                         multiplicative noise EM falls to strong order 1/2, Heun keeps 1)

`em_step` and `stochastic_heun_step` are the generic one-step maps the reverse-SDE samplers
and benchmarks/solver_order.py share.

Must agree with: an oracle score of a one-point data set (every sampler returns the point),
refdiff.ddpm.ddim (dpm_solver_pp_ddpm at order 1, draw for draw), their theoretical orders
(benchmarks/solver_order.py), diffusers' DPMSolverMultistepScheduler and Karras Heun (by hand,
docs/likelihood-and-solvers.md).
"""
from __future__ import annotations

import math
import os

import numpy as np
from scipy.integrate import solve_ivp
from scipy.optimize import brentq

from ._checks import check_array_float, check_int, check_real, check_rng
from .nn.base import predictor

SPACINGS = ("uniform", "squared", "logsnr")      # the first two: refdiff.samplers.time_grid


# --- shared helpers -----------------------------------------------------------------------------------
def _check_t_min(sde, t_min):
    return check_real(t_min, "t_min", lo=0, hi=sde.T, lo_open=True, hi_open=True)


def _start(sde, shape, rng, x_T):
    """The initial state: x_T (checked against `shape`) or a prior draw from rng."""
    shape = tuple(shape)
    for s in shape:
        check_int(s, "shape entries", lo=1)
    if x_T is None:
        return sde.prior_sample(shape, check_rng(rng))
    x = check_array_float(x_T, "x_T")
    if x.shape != shape:
        raise ValueError(f"x_T must have shape {shape}; got {x.shape}")
    return x.copy()


def _score(score_fn, x, t):
    s = np.asarray(score_fn(x, np.full(x.shape[0], float(t))), dtype=np.float64)
    if s.shape != x.shape:
        raise ValueError(f"score_fn returned shape {s.shape}; expected {x.shape}")
    if not np.all(np.isfinite(s)):
        raise FloatingPointError(f"the score is NaN or Inf at t = {float(t):.6g}")
    return s


def _coeffs(sde, t):
    g, s = sde.marginal_coeffs(np.float64(t))
    return float(g), float(s)


def _lambda(sde, t):
    g, s = _coeffs(sde, t)
    return math.log(g / s)


def data_prediction(sde, score_fn, x, t):
    """Tweedie: x0_hat = (x + std_t^2 s(x, t)) / gamma_t (for eps-models, (x - std_t eps) / gamma_t)."""
    gamma, std = _coeffs(sde, t)
    return (x + std * std * _score(score_fn, x, t)) / gamma


def time_grid(sde, steps, t_min, spacing="logsnr"):
    """Times T = t_0 > ... > t_N = t_min. "uniform" and "squared": refdiff.samplers.time_grid;
    "logsnr": lambda_t uniform (DPM-Solver's recommended skip for few steps, Lu et al. 2022
    §3.3), each t found by bisection since lambda is monotone."""
    if spacing not in SPACINGS:
        raise ValueError(f"spacing must be one of {SPACINGS}; got {spacing!r}")
    if spacing != "logsnr":
        from .samplers import time_grid as uniform_or_squared   # late: samplers registers this module's samplers
        return uniform_or_squared(sde, steps, t_min, spacing)
    steps, t_min = check_int(steps, "steps", lo=1), _check_t_min(sde, t_min)
    lams = np.linspace(_lambda(sde, sde.T), _lambda(sde, t_min), steps + 1)
    inner = [brentq(lambda t: _lambda(sde, t) - lam, t_min, sde.T, xtol=1e-14, rtol=1e-14) for lam in lams[1:-1]]
    return np.array([sde.T] + inner + [t_min])


# --- DPM-Solver++(2M) --------------------------------------------------------------------------------
def _dpm_pp_update(x, k, alphas, sigmas, data_fn, order, lower_final, history):
    """One step k -> k+1 of DPM-Solver++(2M) (Lu et al. 2022b, Alg. 2), in the closed form
    that needs no infinity when sigma_{k+1} = 0 (the clean end of a DDPM chain):

        1. D_k = x0_hat(x_k, t_k)                                            (one NFE)
        2. h = lambda_{k+1} - lambda_k;  first order: D = D_k;  second: r = h_prev / h,
           D = (1 + 1/(2r)) D_k - 1/(2r) D_{k-1}                              (Alg. 2, line 6)
        3. x_{k+1} = (sigma_{k+1}/sigma_k) x_k - alpha_{k+1} (e^{-h} - 1) D     (eq. 9 / Alg. 2)
                   = (sigma_{k+1}/sigma_k) x_k + (alpha_{k+1} - sigma_{k+1} alpha_k/sigma_k) D
       The first step, a step to sigma = 0 (h = inf) and, with lower_final, the last step
       are first order (diffusers' `lower_order_final`).
    """
    Dk = data_fn(x, k)                                                                        # 1.
    a0, s0, a1, s1 = alphas[k], sigmas[k], alphas[k + 1], sigmas[k + 1]
    last = k == len(alphas) - 2
    second = order == 2 and history and s1 > 0 and not (lower_final and last)
    D = Dk
    if second:                                                                                # 2.
        lam0, lam1, lam_prev = math.log(a0 / s0), math.log(a1 / s1), math.log(alphas[k - 1] / sigmas[k - 1])
        r = (lam0 - lam_prev) / (lam1 - lam0)                                   # h_prev / h
        D = (1 + 1 / (2 * r)) * Dk - 1 / (2 * r) * history[-1]
    history[:] = [Dk]
    return (s1 / s0) * x + (a1 - s1 * a0 / s0) * D                                           # 3.


def dpm_solver_pp(sde, score_fn, shape, steps, rng, t_min=1e-3, order=2, spacing="logsnr",
                  lower_order_final=True, x_T=None):
    """DPM-Solver++(2M) on the linear SDE's probability-flow ODE, alpha = gamma_t,
    sigma = std_t, from T to t_min in `steps` steps (`steps` NFE); see `_dpm_pp_update`.
    lower_order_final: first order at the last step when steps < 15 (as diffusers; it
    stabilises very few steps). t_min = 1e-3 as DPM-Solver's discrete-time default."""
    steps = check_int(steps, "steps", lo=1)
    if order not in (1, 2):
        raise ValueError(f"order must be 1 or 2; got {order!r}")
    ts = time_grid(sde, steps, t_min, spacing)
    co = [_coeffs(sde, t) for t in ts]
    alphas, sigmas = [c[0] for c in co], [c[1] for c in co]
    x, hist = _start(sde, shape, rng, x_T), []
    for k in range(steps):
        x = _dpm_pp_update(x, k, alphas, sigmas, lambda y, j: data_prediction(sde, score_fn, y, ts[j]),
                           order, lower_order_final and steps < 15, hist)
    return x


def dpm_solver_pp_ddpm(model, schedule, shape, rng, steps=20, order=2, spacing="uniform",
                       lower_order_final=True, x_T=None):
    """DPM-Solver++(2M) on a DDPM chain (refdiff.sde.DDPMSchedule) with an eps-model, on DDIM's
    subsequence (refdiff.ddpm.ddim_timesteps) and its end abar_{-1} = 1: alpha = sqrt(abar_i),
    sigma = sqrt(1 - abar_i), x0_hat = (x - sigma eps_theta(x, (i+1)/N)) / alpha. At order 1
    each step is DDIM's eq. 12 with eta = 0, and the single draw is DDIM's, so it returns
    refdiff.ddpm.ddim's images (batch >= n). Runs on the host; works for cosine chains too."""
    from .ddpm import ddim_timesteps, model_time

    if order not in (1, 2):
        raise ValueError(f"order must be 1 or 2; got {order!r}")
    N = schedule.num_steps
    tau = list(ddim_timesteps(N, steps, spacing))
    abar = [schedule.alpha_bars[i] for i in tau] + [1.0]
    alphas, sigmas = [math.sqrt(a) for a in abar], [math.sqrt(1.0 - a) for a in abar]
    F = model.ops

    def data_fn(x, k):
        t = np.full(x.shape[0], model_time(tau[k], N), dtype=model.dtype)
        e = np.asarray(F.to_numpy(predictor(model)(F.asarray(x.astype(model.dtype)), F.asarray(t))), np.float64)
        return (x - sigmas[k] * e) / alphas[k]

    x, hist = _start(_UnitPrior, shape, rng, x_T), []
    for k in range(len(tau)):
        x = _dpm_pp_update(x, k, alphas, sigmas, data_fn, order, lower_order_final and len(tau) < 15, hist)
    return x


class _UnitPrior:
    """The DDPM chain's prior N(0, I) (drawn as refdiff.ddpm.ddim draws it)."""

    @staticmethod
    def prior_sample(shape, rng):
        return rng.standard_normal(shape)


# --- EDM (Karras et al. 2022) ------------------------------------------------------------------------
def edm_sigmas(sigma_min, sigma_max, steps, rho=7.0):
    """Karras et al. 2022 eq. 5: sigma_i = (smax^(1/rho) + i/(N-1) (smin^(1/rho) - smax^(1/rho)))^rho,
    i = 0..N-1, and sigma_N = 0. -> (N + 1,)."""
    steps = check_int(steps, "steps", lo=1)
    rho = check_real(rho, "rho", lo=1e-9)
    i = np.arange(steps)
    frac = i / (steps - 1) if steps > 1 else np.zeros(1)
    s = (sigma_max ** (1 / rho) + frac * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return np.append(s, 0.0)


def _sigma_of_t(sde, t):
    g, s = _coeffs(sde, t)
    return s / g


def t_of_sigma(sde, sigma):
    """The time t in (0, T] with std_t / gamma_t = sigma (monotone in t): by bisection."""
    if sigma >= _sigma_of_t(sde, sde.T):
        return sde.T
    return brentq(lambda t: _sigma_of_t(sde, t) - sigma, 0.0, sde.T, xtol=1e-15, rtol=1e-15)


def edm_sampler(sde, score_fn, shape, steps, rng, t_min=1e-3, rho=7.0, sigma_max=80.0, s_churn=0.0,
                s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0, x_T=None):
    """Karras et al. 2022 Alg. 2 (Alg. 1 when s_churn = 0) on any linear SDE, in the scaled
    state x^ = x / gamma_t, where the probability-flow ODE reads (their eq. 4 with s = gamma)

        dx^/dsigma = (x^ - D(x^; sigma)) / sigma,   D(x^; sigma) = x0_hat(gamma_t x^, t),
        t = t(sigma) (`t_of_sigma`),

    on the grid `edm_sigmas(sigma(t_min), min(sigma_max, sigma(T)), steps, rho)`, sigma_N = 0
    (sigma_max = 80 as EDM for every SDE; the VP SDE's own sigma(T) is 152). Start
    x^_0 = sigma_0 z (Alg. 1, line 1) with z = x_T / prior_std, a prior draw. Per step i:

        1. gamma_i = min(s_churn / N, sqrt 2 - 1) if s_tmin <= sigma_i <= s_tmax else 0
        2. sigma^ = sigma_i (1 + gamma_i) (clamped at sigma(T): beyond T no score exists),
           x^ <- x^ + sqrt(sigma^^2 - sigma_i^2) s_noise z                   (Alg. 2, lines 5-6)
        3. d = (x^ - D(x^; sigma^)) / sigma^,  x' = x^ + (sigma_{i+1} - sigma^) d        (Euler)
        4. if sigma_{i+1} > 0: d' = (x' - D(x'; sigma_{i+1})) / sigma_{i+1},
           x' = x^ + (sigma_{i+1} - sigma^) (d + d') / 2                      (Heun correction)

    The end (sigma = 0) is a clean sample. 2N - 1 NFE; with s_churn = 0 the only draw is x_T.
    """
    steps = check_int(steps, "steps", lo=1)
    t_min = _check_t_min(sde, t_min)
    s_churn, s_noise = check_real(s_churn, "s_churn", lo=0), check_real(s_noise, "s_noise", lo=0)
    sig_top = _sigma_of_t(sde, sde.T)
    sig_max = min(check_real(sigma_max, "sigma_max", lo=1e-12), sig_top)
    sig = edm_sigmas(_sigma_of_t(sde, t_min), sig_max, steps, rho)

    def denoise(x_hat, sigma):
        t = t_of_sigma(sde, sigma)
        gamma = _coeffs(sde, t)[0]
        return data_prediction(sde, score_fn, gamma * x_hat, t)

    x = sig[0] * _start(sde, shape, rng, x_T) / sde.prior_std()
    for i in range(steps):
        churn = min(s_churn / steps, math.sqrt(2) - 1) if s_tmin <= sig[i] <= s_tmax else 0.0   # 1.
        s_hat = min(sig[i] * (1 + churn), sig_top)                                             # 2.
        if s_hat > sig[i]:
            x = x + math.sqrt(s_hat ** 2 - sig[i] ** 2) * s_noise * rng.standard_normal(x.shape)
        d = (x - denoise(x, s_hat)) / s_hat                                                    # 3.
        x_next = x + (sig[i + 1] - s_hat) * d
        if sig[i + 1] > 0:                                                                     # 4.
            d2 = (x_next - denoise(x_next, sig[i + 1])) / sig[i + 1]
            x_next = x + (sig[i + 1] - s_hat) * 0.5 * (d + d2)
        x = x_next
    return x


# --- adaptive RK45 on the probability-flow ODE ----------------------------------------------------
def rk45_ode(sde, score_fn, shape, steps=None, rng=None, t_min=1e-3, rtol=1e-5, atol=1e-5, x_T=None,
             return_nfe=False):
    """The probability-flow ODE dx/dt = f - g^2/2 s from T to t_min by scipy's RK45 (Dormand-
    Prince 5(4)), the whole batch as one system (as score_sde's ode_sampler); the tolerances
    choose the steps, so `steps` must be None. -> x, or (x, nfe) with return_nfe."""
    if steps is not None:
        raise ValueError(f"rk45 is adaptive: its steps come from rtol and atol; got steps={steps!r}")
    rtol = check_real(rtol, "rtol", lo=0, lo_open=True)
    atol = check_real(atol, "atol", lo=0, lo_open=True)
    t_min = _check_t_min(sde, t_min)
    x = _start(sde, shape, rng, x_T)

    def f(t, y):
        xt = y.reshape(x.shape)
        return sde.probability_flow_drift(xt, t, _score(score_fn, xt, t)).ravel()

    sol = solve_ivp(f, (sde.T, t_min), x.ravel(), method="RK45", rtol=rtol, atol=atol)
    if not sol.success:
        raise FloatingPointError(f"RK45 on the probability-flow ODE failed: {sol.message}")
    out = sol.y[:, -1].reshape(x.shape)
    return (out, int(sol.nfev)) if return_nfe else out


# --- reverse SDE: Euler-Maruyama and stochastic Heun -------------------------------------------------
def em_step(b, sigma, x, t0, t1, dW):
    """Euler-Maruyama: x + b(x, t0) h + sigma(x, t0) dW, h = |t1 - t0|, dW ~ N(0, h)."""
    return x + b(x, t0) * abs(t1 - t0) + sigma(x, t0) * dW


def stochastic_heun_step(b, sigma, x, t0, t1, dW):
    """Stochastic Heun (Rümelin 1982; Kloeden & Platen §15.1), h = |t1 - t0|:

        x~ = x + b(x, t0) h + sigma(x, t0) dW                                  (EM predictor)
        x' = x + (b(x, t0) + b(x~, t1)) h / 2 + (sigma(x, t0) + sigma(x~, t1)) dW / 2

    It converges to the Stratonovich solution: the same as Ito when sigma does not depend
    on x (the reverse diffusion SDE); for an Ito SDE with multiplicative noise pass the
    Stratonovich drift b - 1/2 sigma dsigma/dx.
    """
    h = abs(t1 - t0)
    b0, s0 = b(x, t0), sigma(x, t0)
    x_pred = x + b0 * h + s0 * dW
    return x + 0.5 * (b0 + b(x_pred, t1)) * h + 0.5 * (s0 + sigma(x_pred, t1)) * dW


def _reverse_fields(sde, score_fn):
    """Drift and diffusion of the reverse SDE in reverse time (report eq. 2.6), as functions
    of forward time t: b = -f(x, t) + g(t)^2 s(x, t), sigma = g(t)."""
    def b(x, t):
        return -sde.reverse_drift(x, t, _score(score_fn, x, t))

    def sigma(x, t):
        return float(sde.diffusion(np.float64(t)))

    return b, sigma


def reverse_heun(sde, score_fn, shape, steps, rng, t_min=1e-5, spacing="squared", x_T=None):
    """The reverse SDE from T to t_min by `stochastic_heun_step` on the grid of
    refdiff.samplers (same draws as its euler_maruyama: one N(0, I) per step but the last,
    which adds no noise). 2N NFE."""
    ts = time_grid(sde, check_int(steps, "steps", lo=1), t_min, spacing)
    b, sigma = _reverse_fields(sde, score_fn)
    x = _start(sde, shape, rng, x_T)
    for k in range(steps):
        h = ts[k] - ts[k + 1]
        dW = math.sqrt(h) * rng.standard_normal(x.shape) if k < steps - 1 else 0.0
        x = stochastic_heun_step(b, sigma, x, ts[k], ts[k + 1], dW)
    return x




# --- from a checkpoint ----------------------------------------------------------------------------------
def continuous_sde(meta, what):
    """The VP SDE whose discretisation is the DDPM chain a checkpoint was trained on
    (refdiff.ddpm.vp_for_schedule); `what` names the caller in the error a cosine chain gets,
    which has no such limit."""
    from .ddpm import schedule_from_meta, vp_for_schedule

    schedule = schedule_from_meta(meta)
    if schedule.kind != "linear":
        raise ValueError(f"{what} needs a continuous-time model: the VP SDE limit of a linear DDPM chain; this "
                         f"model was trained on a {schedule.kind!r} chain, which has none (use the samplers "
                         f"ddpm, ddim or dpm2m, which run on the chain itself)")
    return vp_for_schedule(schedule)


CHECKPOINT_SAMPLERS = ("dpm2m", "edm", "edm-sde", "rk45", "heun-sde")


def sample_from_checkpoint(model, meta, n, rng, sampler="dpm2m", steps=None, batch=256, rtol=1e-5, atol=1e-5,
                           s_churn=10.0):
    """n samples from an eps-model checkpoint (refdiff.checkpoint.load_model) with the samplers
    of this module, `batch` images at a time, reshaped to meta["image_shape"]:

        dpm2m     DPM-Solver++(2M) on the checkpoint's own DDPM chain (any schedule), steps default 20 (on
                  DDIM's uniform skip where steps divides N, else linspace)
        edm       EDM Heun (S_churn = 0) on the chain's VP SDE, steps default 18 (35 NFE)
        edm-sde   EDM's stochastic sampler, S_churn = `s_churn`, steps default 18
        rk45      adaptive RK45 on the VP SDE's probability-flow ODE (rtol, atol; steps must be None)
        heun-sde  stochastic Heun on the reverse VP SDE, steps default 500, then one Tweedie step

    The continuous ones feed the model the SDE's time t (step i of the chain is t = (i+1)/N,
    refdiff.ddpm), from T = 1 down to 1e-3, as refdiff.ddpm.em_vp. Returns (x, nfe): x
    (n, *image_shape) float64, nfe the score evaluations per image batch (the largest)."""
    from .ddpm import model_input_shape, schedule_from_meta
    from .losses import score_fn_from_model

    if sampler not in CHECKPOINT_SAMPLERS:
        raise ValueError(f"sampler must be one of {CHECKPOINT_SAMPLERS}; got {sampler!r}")
    if getattr(model, "kind", None) != "eps":
        raise ValueError(f"model {getattr(model, 'name', model)!r} is not a noise predictor (kind 'eps')")
    n, batch = check_int(n, "n", lo=1), check_int(batch, "batch", lo=1)
    if sampler != "rk45" and steps is not None:
        steps = check_int(steps, "steps", lo=1)
    shape1 = model_input_shape(model)
    if sampler == "dpm2m":
        schedule = schedule_from_meta(meta)
        steps = 20 if steps is None else steps
        # the time steps as refdiff.ddpm's DDIM picks them: DDIM's uniform skip where steps divides N, else
        # linspace (both start at N - 1); the command line has no --spacing for this sampler
        spacing = "uniform" if schedule.num_steps % steps == 0 else "linspace"
        run = lambda shp: (dpm_solver_pp_ddpm(model, schedule, shp, rng, steps=steps, spacing=spacing),   # noqa: E731
                           steps)
    else:
        sde = continuous_sde(meta, f"the {sampler} sampler")
        sf = score_fn_from_model(model, sde)
        if sampler in ("edm", "edm-sde"):
            steps = 18 if steps is None else steps
            churn = s_churn if sampler == "edm-sde" else 0.0
            run = lambda shp: (edm_sampler(sde, sf, shp, steps, rng, s_churn=churn), 2 * steps - 1)   # noqa: E731
        elif sampler == "rk45":
            run = lambda shp: rk45_ode(sde, sf, shp, steps, rng, rtol=rtol, atol=atol, return_nfe=True)   # noqa: E731
        else:
            steps = 500 if steps is None else steps

            def run(shp):
                x = reverse_heun(sde, sf, shp, steps, rng, t_min=1e-3, spacing="uniform")
                return data_prediction(sde, sf, x, 1e-3), 2 * steps + 1
    outs, nfe = [], 0
    for start in range(0, n, batch):
        x, k = run((min(batch, n - start),) + shape1)
        outs.append(x)
        nfe = max(nfe, int(k))
    image_shape = tuple((meta or {}).get("image_shape") or shape1)
    return np.concatenate(outs).reshape((n,) + image_shape), nfe


__all__ = ["SPACINGS", "CHECKPOINT_SAMPLERS", "data_prediction", "time_grid", "dpm_solver_pp", "dpm_solver_pp_ddpm",
           "edm_sigmas", "t_of_sigma", "edm_sampler", "rk45_ode", "em_step", "stochastic_heun_step",
           "reverse_heun", "continuous_sde", "sample_from_checkpoint"]
