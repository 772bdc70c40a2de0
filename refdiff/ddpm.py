"""DDPM training loss and samplers for noise-prediction models eps_theta(x, t) (reference).

Discrete chain (refdiff.sde.DDPMSchedule, Ho, Jain & Abbeel 2020): steps i = 0..N-1 here
are the paper's t = 1..N, beta_i linear 1e-4 -> 0.02, alpha_i = 1 - beta_i,
abar_i = prod_{k<=i} alpha_k, and abar_{-1} := 1 (the clean data).

Model time. Every eps-model takes a continuous time in [0, T = 1] and multiplies it by its
`time_scale` (1000) before the sinusoidal embedding. Step i is fed as t = (i + 1) / N, so
the embedding sees the paper's integer 1..N, and the same network can be used by the
VP-SDE sampler `em_vp`: VP(beta_min = 0.1, beta_max = 20) is the continuous limit of the
linear chain, beta(t) = N beta_{tN} (Song et al. 2021, §3.4 and appendix B).

Samplers (all start from fresh N(0, I) noise drawn from the host `rng`, keep the state in
float64 on the model's backend, call the model in its own dtype, run `batch` images at a
time, and return host float64 arrays):

    ancestral   Ho et al. Alg. 2 / eq. 11 (report §3.3.1), variance beta or beta_tilde
    ddim        Song, Meng & Ermon 2021 eq. 12 with sigma from eq. 16 (eta), on a subsequence
    em_vp       reverse-time Euler-Maruyama on VP(0.1, 20) (refdiff.samplers), score
                -eps_theta / std_t, then one Tweedie denoising step

Networks of another prediction target (x0, v) and class-conditional ones sampled with
classifier-free guidance reach these samplers as eps-models through refdiff.prediction
(applied where a checkpoint is loaded: refdiff.generate.load_generator); `ddpm_loss` trains
any target.

Trajectories: `return_trajectory=True` also returns `frames` evenly spaced states
(F, n, ...) in float32, first = the prior draw, last = the output (for GIFs); frames=None
keeps every state.
"""
from __future__ import annotations

import math

import numpy as np

from ._checks import check_array_float, check_finite_state, check_int, check_real, check_rng
from .nn.base import predictor
from .sde import VP, DDPMSchedule

DDPM_SAMPLERS = ("ddpm", "ddim", "em")
VARIANCES = ("beta", "beta_tilde")
SCORE_STDS = ("continuous", "discrete")
DDIM_SPACINGS = ("uniform", "linspace", "quadratic", "trailing")


def model_time(i, num_steps):
    """Discrete step i in {0..N-1} -> model time (i + 1) / N in (0, 1]."""
    return (np.asarray(i, dtype=np.float64) + 1.0) / num_steps


def model_input_shape(model):
    """Per-example input shape of an eps-model: `model.input_shape` if it has one, else
    (dim,) for the MLP, (in_channels, image_size, image_size) for the UNet."""
    shape = getattr(model, "input_shape", None)
    if shape is not None:
        return tuple(int(s) for s in shape)
    c = model.config
    if "dim" in c:
        return (int(c["dim"]),)
    if "image_size" in c:
        return (int(c.get("in_channels", 1)), int(c["image_size"]), int(c["image_size"]))
    raise ValueError(f"cannot tell the input shape of model {getattr(model, 'name', model)!r}")


# --- training loss --------------------------------------------------------------------------------
def ddpm_loss(model, schedule, x0, rng, pred="eps", y=None, label_dropout=0.0):
    """Ho et al. 2020's simple loss (eq. 14; Alg. 1), as the mean over the batch and pixels:

        i ~ U{0..N-1},  eps ~ N(0, I),  x_i = sqrt(abar_i) x0 + sqrt(1 - abar_i) eps   (eq. 4)
        L = mean (net(x_i, (i+1)/N) - target)^2

    target = eps (pred "eps", the paper's), x0 ("x0") or v = sqrt(abar_i) eps - sqrt(1 - abar_i) x0
    ("v", Salimans & Ho 2022; refdiff.prediction). x0 (B, ...) host array. A class-conditional
    network (config["num_classes"] K > 0) gets the labels y (B,) ints in [0, K-1], each replaced
    by the null label K with probability `label_dropout` (Ho & Salimans 2022, Alg. 1); a network
    with dropout (`uses_dropout`) gets `rng` and draws its masks from it. The draws come from
    `rng` in that order (i, eps, the label-dropout uniforms when label_dropout > 0, the
    network's dropout). The gradient is left in model.grads (accumulated: zero_grad first), as
    refdiff.losses.dsm.
    """
    from .prediction import check_labels, check_prediction, num_classes, target_of

    check_rng(rng)
    check_prediction(pred)
    x0 = check_array_float(x0, "x0")
    if x0.ndim < 2 or x0.shape[0] < 1:
        raise ValueError(f"x0 must have shape (B, ...) with B >= 1; got {x0.shape}")
    B, D = x0.shape[0], int(np.prod(x0.shape[1:]))
    K = num_classes(model)
    label_dropout = check_real(label_dropout, "label_dropout", lo=0, hi=1, hi_open=True)
    if label_dropout > 0 and K == 0:
        raise ValueError(f"label_dropout = {label_dropout} needs a class-conditional model; "
                         f"{getattr(model, 'name', 'this model')!r} is unconditional (num_classes 0)")
    i = rng.integers(0, schedule.num_steps, size=B)
    eps = rng.standard_normal(x0.shape)
    mean, std = schedule.marginal(x0, i)
    xt = mean + std * eps
    kwargs = {}
    if K:
        if y is None:
            raise ValueError(f"model {model.name!r} is class-conditional (num_classes {K}): the loss needs labels y")
        labels = check_labels(model, y, "labels").copy()
        if labels.shape != (B,):
            raise ValueError(f"labels y must have shape ({B},); got {labels.shape}")
        if label_dropout > 0:
            labels[rng.random(B) < label_dropout] = K                    # the null label: unconditional
        kwargs["y"] = labels
    if getattr(model, "uses_dropout", False):
        kwargs["rng"] = rng
    target = eps if pred == "eps" else target_of(pred, x0, eps, schedule.alpha_bars[i])
    F, dtype = model.ops, model.dtype
    out = model.forward(F.asarray(xt.astype(dtype)), F.asarray(model_time(i, schedule.num_steps).astype(dtype)),
                        **kwargs)
    # mse_forward sums over features and averages over the batch: weight 1/D gives the pixel mean
    loss, cache = F.mse_forward(out, F.asarray(target.astype(dtype)), F.asarray(np.full(B, 1.0 / D, dtype=dtype)))
    model.backward(F.mse_backward(cache))
    return loss


# --- helpers shared by the samplers -----------------------------------------------------------------
# The state x lives on the model's backend (model.ops: NumPy, numba, CuPy...) in float64; the
# model is called in its own dtype; every random draw comes from the host `rng`, so that a
# seed gives the same images on every backend (within float rounding).
def _predict_eps(model, x, t, step):
    """eps_theta(x, t) for a float64 backend array x (B, ...) and one model time t -> float64.
    A NaN or Inf output (a diverged model) raises FloatingPointError naming `step` and t."""
    F, dtype = model.ops, model.dtype
    e = predictor(model)(x.astype(dtype), F.asarray(np.full(x.shape[0], t, dtype=dtype)))
    if e.shape != x.shape:
        raise ValueError(f"model returned shape {e.shape} for input {x.shape}")
    check_finite_state(bool(F.xp.all(F.xp.isfinite(e))), "the model's output", step, t)
    return e.astype(np.float64)


def _normal(model, rng, shape):
    """N(0, I) drawn on the host (float64), moved to the model's backend."""
    return model.ops.asarray(rng.standard_normal(shape))


def _check_frames(frames):
    if frames is not None and not (isinstance(frames, (int, np.integer)) and frames >= 2):
        raise ValueError(f"frames must be an integer >= 2 (or None for every step); got {frames!r}")


class _Recorder:
    """Keeps `frames` evenly spaced states out of `total` (+1 for the start), as host float32."""

    def __init__(self, total, frames, to_numpy):
        _check_frames(frames)
        n = total + 1 if frames is None else min(frames, total + 1)
        self.keep = set(np.round(np.linspace(0, total, n)).astype(int).tolist())
        self.states, self.k, self.to_numpy = [], 0, to_numpy

    def __call__(self, x):
        if self.k in self.keep:
            self.states.append(np.asarray(self.to_numpy(x), dtype=np.float32).copy())
        self.k += 1


def _check_shape(shape):
    shape = tuple(shape)
    if len(shape) < 2 or not all(isinstance(s, (int, np.integer)) and s >= 1 for s in shape):
        raise ValueError(f"shape must be (n, ...) of positive integers; got {shape}")
    return tuple(int(s) for s in shape)


def _chunked(model, run, shape, batch, return_trajectory, total, frames):
    """Call run(chunk_shape, rec) -> x (backend) for chunks of at most `batch` images and
    concatenate on the host (trajectories along their image axis)."""
    check_int(batch, "batch", lo=1)
    shape = _check_shape(shape)
    to_numpy = model.ops.to_numpy
    if return_trajectory:
        _check_frames(frames)                       # before any work
    outs, trajs = [], []
    for start in range(0, shape[0], batch):
        rec = _Recorder(total, frames, to_numpy) if return_trajectory else None
        x = run((min(batch, shape[0] - start),) + shape[1:], rec or (lambda x: None))
        outs.append(np.asarray(to_numpy(x), dtype=np.float64))
        trajs.append(np.stack(rec.states) if rec else None)
    x = np.concatenate(outs)
    return (x, np.concatenate(trajs, axis=1)) if return_trajectory else x


# --- ancestral sampling (DDPM) ----------------------------------------------------------------------
def ancestral(model, schedule, shape, rng, variance="beta", clip=False, return_trajectory=False,
              frames=None, batch=256):
    """Ho et al. 2020 Alg. 2 (report §3.3.1). From x_{N-1} ~ N(0, I), for i = N-1 .. 0:

        1. eps = eps_theta(x_i, (i+1)/N)
        2. sigma_i^2 = beta_i ("beta") or beta_tilde_i = (1 - abar_{i-1}) / (1 - abar_i) beta_i
           ("beta_tilde"); the paper found both to give similar samples (§3.2)
        3. x_{i-1} = (x_i - beta_i / sqrt(1 - abar_i) eps) / sqrt(alpha_i) + sigma_i z     (eq. 11)
           z ~ N(0, I), and no noise at the last step (i = 0): the op `ddpm_step` of the
           model's backend (refdiff.nn.steps.ddpm_step), one fused pass on its device.
           clip=True instead: x0_hat = (x_i - sqrt(1 - abar_i) eps) / sqrt(abar_i) clipped
           to [-1, 1], and the mean is that of the posterior q(x_{i-1} | x_i, x0_hat)  (eq. 7)
           (diffusers' clip_sample; equal to eq. 11 when nothing is clipped).
    """
    if variance not in VARIANCES:
        raise ValueError(f"variance must be one of {VARIANCES}; got {variance!r}")
    check_rng(rng)
    s, N, F = schedule, schedule.num_steps, model.ops

    def run(shp, rec):
        x = _normal(model, rng, shp)
        rec(x)
        for i in reversed(range(N)):
            eps = _predict_eps(model, x, model_time(i, N), i)                       # 1.
            a, ab, b = s.alphas[i], s.alpha_bars[i], s.betas[i]
            ab_prev = s.alpha_bars[i - 1] if i > 0 else 1.0
            var = b if variance == "beta" else (1 - ab_prev) / (1 - ab) * b         # 2.
            z = _normal(model, rng, shp) if i > 0 else None
            if clip:                                                                # 3.
                x0 = F.xp.clip((x - math.sqrt(1 - ab) * eps) / math.sqrt(ab), -1.0, 1.0)
                x = (math.sqrt(ab_prev) * b / (1 - ab)) * x0 + (math.sqrt(a) * (1 - ab_prev) / (1 - ab)) * x
                x = x + math.sqrt(var) * z if z is not None else x
            else:
                x = F.ddpm_step(x, eps, z, b, ab, math.sqrt(var))
            rec(x)
        return x

    return _chunked(model, run, shape, batch, return_trajectory, N, frames)


# --- DDIM -----------------------------------------------------------------------------------------------
def ddim_timesteps(num_steps, steps, spacing="uniform"):
    """The subsequence tau of {0..N-1} DDIM visits, in decreasing order.

    "uniform"   i = k N / S, k = 0..S-1: DDIM's uniform skip (ermongroup/ddim, runners/diffusion.py:
                range(0, N, N // S)), equal to diffusers' "leading". S must divide N: otherwise
                DDIM's range has ceil(N / (N // S)) != S steps, and "leading" starts at
                (S - 1)(N // S), far from N - 1 (S = 600 at N = 1000: i = 599, sqrt(abar) = 0.16);
                such S raise ValueError pointing to "linspace" and "trailing".
    "linspace"  i = round(k (N - 1) / (S - 1)), k = 0..S-1: from N - 1 down to 0 for every S
                (diffusers' timestep_spacing="linspace")
    "quadratic" i = int(k'^2), k' = linspace(0, sqrt(0.8 N), S): DDIM's "quad" skip (§D.2, used
                for CIFAR-10 with S = 50 and 100), each index once. DDIM's code repeats the
                smallest indices when S >= 30 at N = 1000 (S = 50 gives 49 distinct, 100 gives 96);
                a repeat is a step from abar_i to abar_i, which eq. 12 makes the identity (sigma = 0
                too), so dropping it leaves the result and saves a model call.
    "trailing"  i = round(N - k N / S) - 1, k = 0..S-1: always starts at N-1 (Lin et al. 2024)

    Length S, except "quadratic" (S or fewer, see above).
    """
    check_int(steps, "DDIM steps", lo=1, hi=num_steps)
    if spacing == "uniform":
        if num_steps % steps:
            raise ValueError(f"DDIM steps = {steps} does not divide N = {num_steps}: the 'uniform' skip "
                             f"range(0, N, N // S) would not start near N - 1; use spacing 'linspace' or "
                             f"'trailing' (both start at N - 1), or steps dividing N")
        tau = np.arange(0, num_steps, num_steps // steps)
    elif spacing == "linspace":
        tau = np.linspace(0, num_steps - 1, steps).round().astype(int)
    elif spacing == "quadratic":
        tau = np.unique((np.linspace(0, math.sqrt(0.8 * num_steps), steps) ** 2).astype(int))
    elif spacing == "trailing":
        # not np.arange(N, 0, -N / S): with a float step that can yield S + 1 entries, the last
        # rounding to -1 (e.g. N = 1000, S = 61), which would index abar from the end
        tau = np.round(num_steps - np.arange(steps) * (num_steps / steps)).astype(int) - 1
    else:
        raise ValueError(f"DDIM spacing must be one of {DDIM_SPACINGS}; got {spacing!r}")
    return np.sort(tau)[::-1].copy()


def ddim(model, schedule, shape, rng, steps=50, eta=0.0, spacing="uniform", clip=False,
         return_trajectory=False, frames=None, batch=256):
    """DDIM (Song, Meng & Ermon 2021). On the subsequence tau_1 > ... > tau_S, for each
    step i -> j (the next tau, or j = -1 with abar_{-1} = 1 after the last):

        1. eps = eps_theta(x_i, (i+1)/N)
        2. x0_hat = (x_i - sqrt(1 - abar_i) eps) / sqrt(abar_i)               ("predicted x0", eq. 12)
           (clip=True: clipped to [-1, 1] and eps recomputed from it: diffusers' DDIMScheduler
           with clip_sample=True *and* use_clipped_model_output=True; with its default
           use_clipped_model_output=False diffusers keeps the model's eps in step 4)
        3. sigma = eta sqrt((1 - abar_j) / (1 - abar_i)) sqrt(1 - abar_i / abar_j)     (eq. 16)
        4. x_j = sqrt(abar_j) x0_hat + sqrt(1 - abar_j - sigma^2) eps + sigma z        (eq. 12)

    eta = 0: deterministic (DDIM); eta = 1 on the full grid (steps = N, "uniform") is
    ancestral sampling with variance beta_tilde, draw for draw. z is drawn only when
    sigma can be > 0 (eta > 0, not the last step), so with eta = 0 the only draw is x_T.
    """
    eta = check_real(eta, "eta", lo=0, hi=1)
    check_rng(rng)
    s, N, xp = schedule, schedule.num_steps, model.ops.xp
    tau = ddim_timesteps(N, steps, spacing)

    def run(shp, rec):
        x = _normal(model, rng, shp)
        rec(x)
        for k, i in enumerate(tau):
            j = tau[k + 1] if k + 1 < len(tau) else -1
            ab, ab_prev = s.alpha_bars[i], (s.alpha_bars[j] if j >= 0 else 1.0)
            eps = _predict_eps(model, x, model_time(i, N), i)                            # 1.
            x0 = (x - math.sqrt(1 - ab) * eps) / math.sqrt(ab)                           # 2.
            if clip:
                x0 = xp.clip(x0, -1.0, 1.0)
                eps = (x - math.sqrt(ab) * x0) / math.sqrt(1 - ab)
            sigma = eta * math.sqrt((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev))        # 3.
            x = math.sqrt(ab_prev) * x0 + math.sqrt(max(1 - ab_prev - sigma ** 2, 0.0)) * eps   # 4.
            if eta > 0 and j >= 0:
                x = x + sigma * _normal(model, rng, shp)
            rec(x)
        return x

    return _chunked(model, run, shape, batch, return_trajectory, len(tau), frames)


# --- reverse VP SDE ---------------------------------------------------------------------------------------
def _score_coeffs(sde, score_std, schedule):
    """t -> (gamma, std) as floats, for em_vp's eps -> score conversion (see its docstring)."""
    if score_std not in SCORE_STDS:
        raise ValueError(f"score_std must be one of {SCORE_STDS}; got {score_std!r}")
    if score_std == "continuous":
        return lambda t: tuple(float(c) for c in sde.marginal_coeffs(np.float64(t)))
    abar = schedule.alpha_bars if schedule is not None else np.cumprod(1.0 - sde.discrete_betas(1000))
    N = len(abar)

    def coeffs(t):
        i = min(max(int(round(t * N)) - 1, 0), N - 1)
        return math.sqrt(abar[i]), math.sqrt(1.0 - abar[i])

    return coeffs


def em_vp(model, shape, rng, steps=1000, t_min=1e-3, spacing="uniform", denoise=True,
          return_trajectory=False, frames=None, batch=256, sde=None, score_std="continuous", schedule=None):
    """Reverse-time Euler-Maruyama (report eq. 2.6; refdiff.samplers.euler_maruyama, same grid
    and draws) on VP(beta_min 0.1, beta_max 20) from T = 1 down to `t_min` (1e-3 as
    score_sde's VP sampling: a DDPM-trained model never saw times below 1/N), with the
    score s = -eps_theta(x, t) / std_t (refdiff.losses.score_fn_from_model). Each update is
    the op `em_step` of the model's backend (refdiff.nn.steps.em_step):

        x <- x + a(t) x h + g(t)^2 s h + g(t) sqrt(h) z,   h = t_k - t_{k+1}, a = beta(t) / 2, g = sqrt(beta(t))

    with no noise at the last step.

    score_std: the std in s = -eps_theta / std (and in the Tweedie step below).
        "continuous" (default): std_t = sqrt(1 - gamma_t^2) of the VP SDE, exact for a model
            trained on the SDE's marginals (refdiff.losses.dsm);
        "discrete": sqrt(1 - abar_i) of the DDPM chain `schedule` (default: the chain of
            `sde`, sde.discrete_betas(1000)) at its step i = round(t N) - 1, the step whose
            model time (i + 1) / N is nearest t: the noise level a DDPM-trained model saw at
            that input (score_sde uses sqrt(1 - alphas_cumprod) for discretely trained models).

    denoise=True then applies Tweedie's formula once (Efron 2011; as in Song & Ermon's
    `denoise` option): x0 = (x - std eps_theta(x, t_min)) / gamma = E[x0 | x_{t_min}] with
    (gamma, std) at t_min, which removes the noise of level std ~ 0.01 that the SDE stops at
    ("discrete": gamma = sqrt(abar_i), std = sqrt(1 - abar_i) at t_min's chain step).
    """
    from .samplers import time_grid

    sde = VP(0.1, 20.0) if sde is None else sde
    check_rng(rng)
    ts = time_grid(sde, steps, t_min, spacing)
    coeffs = _score_coeffs(sde, score_std, schedule)
    F = model.ops

    def run(shp, rec):
        x = F.asarray(sde.prior_sample(shp, rng))
        for k in range(steps):
            rec(x)
            t, h = float(ts[k]), float(ts[k] - ts[k + 1])
            std = coeffs(t)[1]
            score = _predict_eps(model, x, t, k) * (-1.0 / std)
            z = _normal(model, rng, shp) if k < steps - 1 else None
            x = F.em_step(x, score, z, float(sde.a(np.float64(t))), float(sde.diffusion(np.float64(t))), h)
        if denoise:
            rec(x)
            gamma, std = coeffs(t_min)
            x = (x - std * _predict_eps(model, x, t_min, steps)) / gamma
        rec(x)
        return x

    return _chunked(model, run, shape, batch, return_trajectory, steps + int(denoise), frames)


# --- from a checkpoint --------------------------------------------------------------------------------------
def schedule_from_meta(meta):
    """The DDPMSchedule a checkpoint was trained with (refdiff.train records it), else the
    report's linear 1e-4 -> 0.02, N = 1000."""
    cfg = (meta or {}).get("ddpm_schedule") or {}
    return DDPMSchedule(**cfg)


def vp_for_schedule(schedule):
    """The VP SDE whose discretisation is `schedule`: beta(t) = N beta_{tN}, so a linear chain
    beta_start -> beta_end over N steps is VP(N beta_start, N beta_end) (Song et al. 2021,
    appendix B; the report's chain gives VP(0.1, 20)). A cosine chain has no linear-beta VP
    SDE: ValueError."""
    if schedule.kind != "linear":
        raise ValueError(f"the em sampler needs a linear DDPM schedule (its VP SDE limit); this model was "
                         f"trained on a {schedule.kind!r} schedule: use --sampler ddpm or ddim")
    N = schedule.num_steps
    return VP(N * schedule.beta_start, N * schedule.beta_end)


def sample_from_checkpoint(model, meta, n, rng, sampler="ddpm", steps=None, eta=0.0, variance="beta",
                           spacing=None, clip=False, batch=256, return_trajectory=False, frames=None):
    """n samples from an eps-model loaded by refdiff.checkpoint.load_model, reshaped to the
    image shape the checkpoint records (meta["image_shape"], default the model's input
    shape). sampler "ddpm" (ancestral; steps must be None or N), "ddim" (steps default 50;
    spacing default DDIM's "uniform" when steps divides N, else "linspace", which also
    starts at N - 1), "em" (em_vp; steps default 1000, spacing default "uniform", or
    "squared": refdiff.samplers.time_grid).
    Returns x (n, C, H, W) float64, or (x, trajectory (F, n, C, H, W)); not clipped."""
    if sampler not in DDPM_SAMPLERS:
        raise ValueError(f"sampler must be one of {DDPM_SAMPLERS}; got {sampler!r}")
    if getattr(model, "kind", None) != "eps":
        raise ValueError(f"model {getattr(model, 'name', model)!r} is not a noise predictor (kind 'eps')")
    schedule = schedule_from_meta(meta)
    shape = (check_int(n, "n", lo=1),) + model_input_shape(model)
    common = dict(return_trajectory=return_trajectory, frames=frames, batch=batch)
    if sampler == "ddpm":
        if steps is not None and steps != schedule.num_steps:
            raise ValueError(f"ddpm (ancestral) sampling runs all {schedule.num_steps} steps of the chain; "
                             f"got steps={steps} (use --sampler ddim for fewer)")
        out = ancestral(model, schedule, shape, rng, variance=variance, clip=clip, **common)
    elif sampler == "ddim":
        steps = 50 if steps is None else steps
        if spacing is None:
            divides = isinstance(steps, int) and steps > 0 and schedule.num_steps % steps == 0
            spacing = "uniform" if divides else "linspace"
        out = ddim(model, schedule, shape, rng, steps=steps, eta=eta, spacing=spacing, clip=clip, **common)
    else:
        out = em_vp(model, shape, rng, steps=1000 if steps is None else steps, spacing=spacing or "uniform",
                    sde=vp_for_schedule(schedule), **common)
    image_shape = tuple((meta or {}).get("image_shape") or shape[1:])
    x, traj = out if return_trajectory else (out, None)
    x = x.reshape((int(n),) + image_shape)
    return (x, traj.reshape(traj.shape[:2] + image_shape)) if return_trajectory else x


__all__ = ["DDPM_SAMPLERS", "model_time", "model_input_shape", "ddpm_loss", "ancestral", "ddim_timesteps",
           "ddim", "em_vp", "schedule_from_meta", "vp_for_schedule", "sample_from_checkpoint"]
