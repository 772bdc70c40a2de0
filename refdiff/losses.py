"""Training losses. Each takes the model, computes the loss, runs the model's backward so
that the parameter gradients are left in `model.grads` (accumulated: call zero_grad
first), and returns the loss as a float.

Models are noise predictors eps_theta(x, t); the score is s_theta = -eps_theta / std_t
(report §3.2.2).
"""
from __future__ import annotations

import numpy as np

from .sde import bcast

WEIGHTINGS = ("noise", "likelihood", "none")


def _check_x0(x0, name="x0"):
    x0 = np.asarray(x0)
    if x0.ndim < 2 or x0.shape[0] < 1:
        raise ValueError(f"{name} must have shape (B, ...) with B >= 1; got {x0.shape}")
    if not np.all(np.isfinite(x0)):
        raise ValueError(f"{name} contains NaN or Inf")
    return x0


def sample_time(sde, batch, rng, eps):
    """t ~ U(eps, T), one per sample."""
    if not (0 < eps < sde.T):
        raise ValueError(f"eps must lie in (0, T={sde.T}); got {eps}")
    return rng.uniform(eps, sde.T, size=batch)


def dsm(model, sde, x0, rng, weighting="noise", eps=1e-5):
    """Continuous denoising score matching (report eq. 3.1, §3.2.2; Song et al. 2021 eq. 7).

    t ~ U(eps, T), z ~ N(0, I), x_t = gamma_t x0 + std_t z, and

        L = T E[ lambda(t) / std_t^2 || eps_theta(x_t, t) - z ||^2 ]

    (per-sample sum over features, mean over the batch). lambda(t): "noise" = std_t^2
    (the epsilon-prediction loss of DDPM), "likelihood" = g(t)^2 (Song et al. 2021b),
    "none" = 1 (the raw Fisher divergence; large at small t).
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}; got {weighting!r}")
    x0 = _check_x0(x0)
    t = sample_time(sde, x0.shape[0], rng, eps)
    z = rng.standard_normal(x0.shape)
    mean, std = sde.marginal(x0, t)
    xt = (mean + std * z).astype(model.dtype)
    std1 = np.asarray(std).reshape(-1)
    if weighting == "noise":
        w = np.ones_like(t)
    elif weighting == "likelihood":
        w = sde.diffusion(t) ** 2 / std1 ** 2
    else:
        w = 1.0 / std1 ** 2
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
        eps = F.to_numpy(model.forward(F.asarray(x.astype(model.dtype)), F.asarray(t.astype(model.dtype))))
        return -eps / bcast(std, eps)

    return score_fn


LOSSES = {"dsm": dsm}
