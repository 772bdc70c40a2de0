"""Training losses. Each takes the model, computes the loss, runs the model's backward so
that the parameter gradients are left in `model.grads` (accumulated: call zero_grad
first), and returns the loss as a float.

Models are noise predictors eps_theta(x, t); the score is s_theta = -eps_theta / std_t
(report §3.2.2).

Registered by name in LOSSES, each as `(model, sde, x0, rng) -> loss`:

    dsm        denoising score matching (needs p_{t|0})
    ssm        sliced score matching, exact directional derivative (forward mode)
    ssm-vr     its variance-reduced form SSM-VR
    ssm-fd     ssm with the directional derivative by central finite differences
    ssm-vr-fd  ssm-vr likewise

All share t ~ U(t_min, T), x_t = gamma_t x0 + std_t z and the weights T lambda(t) of `dsm`,
drawn from `rng` in the same order (t, then z, then the projections), so with one seed
the SSM losses see the same t and x_t as DSM.
"""
from __future__ import annotations

import math

import numpy as np

from ._checks import check_array_float, check_int, check_positive_finite, check_real, check_rng
from .nn.base import predictor
from .sde import bcast

WEIGHTINGS = ("noise", "likelihood", "none")


def _check_x0(x0, name="x0"):
    x0 = check_array_float(x0, name)
    if x0.ndim < 2 or x0.shape[0] < 1:
        raise ValueError(f"{name} must have shape (B, ...) with B >= 1; got {x0.shape}")
    return x0


def sample_time(sde, batch, rng, t_min):
    """t ~ U(t_min, T), one per sample."""
    check_real(t_min, "t_min", lo=0, hi=sde.T, lo_open=True, hi_open=True)
    return check_rng(rng).uniform(t_min, sde.T, size=batch)


def _eps_weights(sde, t, weighting):
    """lambda(t) / std_t^2 (B,): the weight of a squared error in noise-prediction units,
    ||eps_theta - z||^2 = std_t^2 ||s_theta - score||^2. "noise": lambda = std_t^2 -> 1."""
    if weighting == "noise":
        return np.ones_like(t)
    _, std = sde.marginal_coeffs(t)
    lam = sde.diffusion(t) ** 2 if weighting == "likelihood" else np.ones_like(t)
    return lam / std ** 2


def dsm(model, sde, x0, rng, weighting="noise", t_min=1e-5):
    """Continuous denoising score matching (report eq. 3.1, §3.2.2; Song et al. 2021 eq. 7).

    t ~ U(t_min, T), z ~ N(0, I), x_t = gamma_t x0 + std_t z, and

        L = T E[ lambda(t) / std_t^2 || eps_theta(x_t, t) - z ||^2 ]

    (per-sample sum over features, mean over the batch). lambda(t): "noise" = std_t^2
    (the epsilon-prediction loss of DDPM), "likelihood" = g(t)^2 (Song et al. 2021b),
    "none" = 1 (the raw Fisher divergence; large at small t).
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}; got {weighting!r}")
    x0 = _check_x0(x0)
    t = sample_time(sde, x0.shape[0], rng, t_min)
    z = rng.standard_normal(x0.shape)
    mean, std = sde.marginal(x0, t)
    xt = (mean + std * z).astype(model.dtype)
    w = _eps_weights(sde, t, weighting)
    F = model.ops
    pred = model.forward(F.asarray(xt), F.asarray(t.astype(model.dtype)))
    loss, cache = F.mse_forward(pred, F.asarray(z.astype(model.dtype)), F.asarray((sde.T * w).astype(model.dtype)))
    model.backward(F.mse_backward(cache))
    return loss


def score_fn_from_model(model, sde):
    """Wrap an eps-prediction model as score_fn(x, t) -> -eps_theta(x, t) / std_t (host arrays)."""
    F = model.ops

    def score_fn(x, t):
        t = np.broadcast_to(np.asarray(t, dtype=np.float64), (x.shape[0],))
        _, std = sde.marginal_coeffs(t)
        e = F.to_numpy(predictor(model)(F.asarray(x.astype(model.dtype)), F.asarray(t.astype(model.dtype))))
        return -e / bcast(std, e)

    return score_fn


# --- sliced score matching (report ch. 4) ---------------------------------------------------------
PROJECTIONS = ("gaussian", "rademacher", "sphere")


def sample_projections(shape, rng, kind="rademacher"):
    """Probe directions nu (B, ...) with E[nu nu^T] = I, one per row (Song et al. 2019, §3):
    "gaussian" N(0, I); "rademacher" +-1 entries (the least-variance Hutchinson probe);
    "sphere" uniform on the sphere of radius sqrt(D), D = prod(shape[1:])."""
    check_rng(rng)
    if kind == "gaussian":
        return rng.standard_normal(shape)
    if kind == "rademacher":
        return 2.0 * rng.integers(0, 2, size=shape) - 1.0
    if kind == "sphere":
        g = rng.standard_normal(shape)
        norm = np.sqrt(np.sum(g.reshape(shape[0], -1) ** 2, axis=1))
        return g * bcast(math.sqrt(np.prod(shape[1:])) / norm, g)
    raise ValueError(f"projection must be one of {PROJECTIONS}; got {kind!r}")


def _ssm_batch(sde, x0, rng, projection, n_projections, t_min, weighting):
    """Check the arguments, draw t, z (as dsm does) then the probes. Each sample is repeated
    n_projections times (rows r = m B + b), so the mean over the R = n_projections B rows is
    the mean over samples of the mean over probes. -> xt (R, ...), t, std, w (R,), nu (R, ...)."""
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}; got {weighting!r}")
    if projection not in PROJECTIONS:
        raise ValueError(f"projection must be one of {PROJECTIONS}; got {projection!r}")
    check_int(n_projections, "n_projections", lo=1)
    x0 = _check_x0(x0)
    t = sample_time(sde, x0.shape[0], rng, t_min)
    z = rng.standard_normal(x0.shape)
    mean, std = sde.marginal(x0, t)
    xt = np.concatenate([mean + std * z] * n_projections)
    t = np.tile(t, n_projections)
    nu = sample_projections(xt.shape, rng, projection)
    return xt, t, sde.marginal_coeffs(t)[1], _eps_weights(sde, t, weighting), nu


def _rows(F, a, like):
    """(R,) host vector -> a backend array shaped to broadcast against `like` (R, ...)."""
    return F.asarray(np.asarray(a, dtype=like.dtype).reshape((-1,) + (1,) * (like.ndim - 1)))


def _require_jvp(model):
    if not callable(getattr(model, "forward_jvp", None)) or not callable(getattr(model, "backward_jvp", None)):
        raise ValueError(f"model {getattr(model, 'name', type(model).__name__)!r} has no forward_jvp/backward_jvp: "
                         f"exact sliced score matching needs them (use ssm_fd, or dsm)")


def ssm(model, sde, x0, rng, projection="rademacher", n_projections=1, variance_reduced=False,
        t_min=1e-5, weighting="noise"):
    """Sliced score matching, time-conditioned as the report's Algorithm 1 (ch. 4).

    Song, Garg, Shi & Ermon (UAI 2019), §3: with probes nu, E[nu nu^T] = I,

        SSM     J = E[ nu^T grad_x(nu^T s) + 1/2 (nu^T s)^2 ]
        SSM-VR  J = E[ nu^T grad_x(nu^T s) + 1/2 ||s||^2 ]      (variance_reduced=True:
                E_nu[(nu^T s)^2] = ||s||^2 taken in closed form; their `sliced_score_estimation_vr`)

    both equal 1/2 E||s - grad log p||^2 up to a constant (Hyvarinen 2005 by parts). Per
    time t with x_t ~ p_t, we minimise the report's form (twice the above: ||s||^2 + 2 nu^T J nu)
    with dsm's weights T lambda(t), so that for every theta

        ssm = dsm - C,   C = T E[lambda(t) ||grad log p_{t|0}||^2] = T D E_t[lambda/std_t^2]

    in expectation (E[s^T grad log p_{t|0}] = E[s^T grad log p_t] = -E[tr grad s], by parts):
    the two losses have one scale and share learning rates, and C = T D for the default
    lambda = std_t^2 ("noise"). In noise-prediction units, s = -eps_theta/std_t, J_s = -J_eps/std_t, so a row is

        T lambda/std^2 ( ||eps||^2  [or (nu^T eps)^2]  -  2 std nu^T J_eps nu ).

    nu^T J_eps nu is exact: J_eps nu comes from the model's forward mode (`forward_jvp`), and
    the parameter gradient from reverse mode through the primal and the tangent pass
    (`backward_jvp`). (The report's code detached this term; then only ||s|| shrinks.)
    """
    _require_jvp(model)
    xt, t, std, w, nu = _ssm_batch(sde, x0, rng, projection, n_projections, t_min, weighting)
    F, dtype = model.ops, model.dtype
    e, edot = model.forward_jvp(F.asarray(xt.astype(dtype)), F.asarray(t.astype(dtype)), F.asarray(nu.astype(dtype)))
    nu = F.asarray(nu.astype(dtype))
    R, axes = e.shape[0], tuple(range(1, e.ndim))
    c = _rows(F, sde.T * w / R, e)                              # d loss / d (row term)
    sd = _rows(F, std, e)
    proj = (nu * e).sum(axis=axes, keepdims=True)              # nu^T eps        (R, 1, ...)
    trace = (nu * edot).sum(axis=axes, keepdims=True)          # nu^T J_eps nu   (R, 1, ...)
    first = (e * e).sum(axis=axes, keepdims=True) if variance_reduced else proj * proj
    loss = float((c * (first - 2 * sd * trace)).sum())
    deps = 2 * c * (e if variance_reduced else proj * nu)
    model.backward_jvp(deps, -2 * c * sd * nu)
    return loss


def ssm_fd(model, sde, x0, rng, projection="rademacher", n_projections=1, variance_reduced=False,
           t_min=1e-5, weighting="noise", fd_step=1e-2):
    """`ssm` with the directional derivative by central differences (Pang et al. 2020, FD-SSM):

        nu^T grad_x(nu^T s) ~ nu^T (s(x + h nu) - s(x - h nu)) / 2h,   s(x) ~ (s(x+h nu) + s(x-h nu)) / 2,

    both O(h^2). One forward and one backward of the plain model on the 2R rows x +- h nu:
    no second-order pass. h = fd_step std_t / sqrt(D), so the step |h nu| ~ fd_step std_t is a
    fixed fraction of the noise scale, the length on which eps_theta(., t) varies. Same
    weights, sign conventions and constant offset to dsm as `ssm` (up to the O(h^2) bias).
    """
    check_positive_finite(fd_step, "fd_step")
    xt, t, std, w, nu = _ssm_batch(sde, x0, rng, projection, n_projections, t_min, weighting)
    F, dtype = model.ops, model.dtype
    h = fd_step * std / math.sqrt(np.prod(xt.shape[1:]))       # (R,)
    step = bcast(h, xt) * nu
    out = model.forward(F.asarray(np.concatenate([xt + step, xt - step]).astype(dtype)),
                        F.asarray(np.tile(t, 2).astype(dtype)))
    R = xt.shape[0]
    ep, em = out[:R], out[R:]
    nu = F.asarray(nu.astype(dtype))
    axes = tuple(range(1, out.ndim))
    c = _rows(F, sde.T * w / R, ep)
    sd_h = _rows(F, std / h, ep)                              # std / h = sqrt(D) / fd_step
    ebar = 0.5 * (ep + em)
    proj = (nu * ebar).sum(axis=axes, keepdims=True)
    trace = 0.5 * sd_h * (nu * (ep - em)).sum(axis=axes, keepdims=True)   # std nu^T J_eps nu
    first = (ebar * ebar).sum(axis=axes, keepdims=True) if variance_reduced else proj * proj
    loss = float((c * (first - 2 * trace)).sum())
    g_first = c * (ebar if variance_reduced else proj * nu)   # d/d ep = d/d em of c first
    g_trace = c * sd_h * nu                                    # d/d ep of -2 c trace is -g_trace
    model.backward(F.xp.concatenate([g_first - g_trace, g_first + g_trace]))
    return loss


def ssm_vr(model, sde, x0, rng, **kwargs):
    """SSM-VR: `ssm(..., variance_reduced=True)`."""
    return ssm(model, sde, x0, rng, variance_reduced=True, **kwargs)


def ssm_vr_fd(model, sde, x0, rng, **kwargs):
    """SSM-VR by finite differences: `ssm_fd(..., variance_reduced=True)`."""
    return ssm_fd(model, sde, x0, rng, variance_reduced=True, **kwargs)


LOSSES = {"dsm": dsm, "ssm": ssm, "ssm-vr": ssm_vr, "ssm-fd": ssm_fd, "ssm-vr-fd": ssm_vr_fd}
