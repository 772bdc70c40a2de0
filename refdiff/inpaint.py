"""Inpainting / imputation with an unconditional score model (reference).

Song et al. 2021, appendix I.2 (score_sde's `controllable_generation.get_pc_inpainter`):
sample the reverse SDE from the prior, and before every step replace the known entries of the
state by a fresh forward-noised copy of the known data at the current time,

    x <- m * (gamma_t y + std_t z') + (1 - m) * x,        z' ~ N(0, I),                (1)

so that the unknown entries are always denoised next to known entries with the right noise
level, and the reverse-time drift carries the known content into them. After the last step the
known entries are set to y itself, so they are exact in the output. (An approximation of
sampling p(x_unknown | x_known): the replaced entries are drawn from p_t(. | y) alone,
whatever the unknown entries' current state; it is what score_sde does.)

Shapes: y (B, ...) the images holding the known values (anything where m = 0), m the mask,
1 = known, 0 = to fill, of shape y.shape or y.shape[1:] (one mask for the batch); values
exactly 0 or 1 (bool accepted). The reverse step is Euler-Maruyama ("em") or the stochastic
Heun step ("heun") of refdiff.solvers on the time grid of refdiff.solvers.time_grid; the last
step adds no noise; `denoise=True` then applies Tweedie's formula once at t_min (as
refdiff.ddpm.em_vp).

Must hold (tests/test_inpaint.py): known entries exact; an all-known mask returns y; with the
exact score of a two-image data set the filled entries are those of the image the known
entries come from.
"""
from __future__ import annotations

import math

import numpy as np

from . import solvers
from ._checks import check_array_float, check_int, check_rng

STEPS = ("em", "heun")


def check_mask(mask, shape):
    """-> the mask as float64, broadcastable to `shape` (B, ...); ValueError naming `mask` if it
    is not of shape `shape` or shape[1:], or holds anything but 0 and 1."""
    m = np.asarray(mask)
    if m.shape not in (tuple(shape), tuple(shape[1:])):
        raise ValueError(f"mask must have the shape of the images {tuple(shape)} or of one image "
                         f"{tuple(shape[1:])}; got {m.shape}")
    if m.dtype == bool:
        return m.astype(np.float64)
    if not np.issubdtype(m.dtype, np.number) or not np.all(np.isin(m, (0, 1))):
        raise ValueError("mask must hold only 0 (to fill) and 1 (known)"
                         + ("" if not np.issubdtype(m.dtype, np.number) else
                            f"; got values such as {m[~np.isin(m, (0, 1))].ravel()[:3].tolist()}"))
    return m.astype(np.float64)


def inpaint(sde, score_fn, y, mask, steps, rng, t_min=1e-3, spacing="squared", step="em", denoise=False):
    """Fill the entries of y where mask = 0 by eq. (1); -> x (y.shape) with x = y where mask = 1."""
    y = check_array_float(y, "y")
    if y.ndim < 2 or y.shape[0] < 1:
        raise ValueError(f"y must have shape (B, ...) with B >= 1; got {y.shape}")
    m = check_mask(mask, y.shape)
    if step not in STEPS:
        raise ValueError(f"step must be one of {STEPS}; got {step!r}")
    check_rng(rng)
    ts = solvers.time_grid(sde, steps, t_min, spacing)
    b, sigma = solvers._reverse_fields(sde, score_fn)
    one_step = solvers.em_step if step == "em" else solvers.stochastic_heun_step
    x = sde.prior_sample(y.shape, rng)
    for k in range(steps):
        gamma, std = (float(c) for c in sde.marginal_coeffs(np.float64(ts[k])))
        x = m * (gamma * y + std * rng.standard_normal(y.shape)) + (1 - m) * x                 # (1)
        h = ts[k] - ts[k + 1]
        dW = math.sqrt(h) * rng.standard_normal(y.shape) if k < steps - 1 else 0.0
        x = one_step(b, sigma, x, ts[k], ts[k + 1], dW)
    if denoise:
        gamma = float(sde.marginal_coeffs(np.float64(ts[-1]))[0])
        x = solvers.data_prediction(sde, score_fn, m * gamma * y + (1 - m) * x, ts[-1])
    return m * y + (1 - m) * x


def inpaint_from_checkpoint(model, meta, images, mask, rng, steps=1000, step="em", batch=256):
    """`inpaint` with an eps-model checkpoint (refdiff.checkpoint.load_model) on the VP SDE of its
    DDPM chain (refdiff.solvers.continuous_sde), from T = 1 to 1e-3 on the uniform grid with a
    final Tweedie step, as refdiff.ddpm.em_vp; `batch` images at a time. images (n, ...) in
    [-1, 1] and mask (n, ...) or (...) as `inpaint`; returns x (images.shape) float64."""
    from .ddpm import model_input_shape
    from .losses import score_fn_from_model
    from .solvers import continuous_sde

    sde = continuous_sde(meta, "inpainting")
    images = np.asarray(images, dtype=np.float64)
    shape1 = model_input_shape(model)
    if images.ndim < 2 or int(np.prod(images.shape[1:])) != int(np.prod(shape1)):
        raise ValueError(f"images must be (n, ...) of {int(np.prod(shape1))} values each for this model; "
                         f"got shape {images.shape}")
    m = np.broadcast_to(check_mask(mask, images.shape), images.shape)
    check_int(batch, "batch", lo=1)
    sf, outs = score_fn_from_model(model, sde), []
    for start in range(0, images.shape[0], batch):
        y, mb = images[start:start + batch], m[start:start + batch]
        shp = (len(y),) + shape1
        x = inpaint(sde, sf, y.reshape(shp), mb.reshape(shp), steps, rng, t_min=1e-3, spacing="uniform",
                    step=step, denoise=True)
        outs.append(x.reshape(y.shape))
    return np.concatenate(outs)


__all__ = ["STEPS", "check_mask", "inpaint", "inpaint_from_checkpoint"]
