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

RePaint's resampling (Lugmayr et al. 2022, "RePaint", Algorithm 1 and §4.2): the replacement
harmonises poorly, since the unknown entries at time t_{k+1} were computed from known entries
that were drawn independently of them. RePaint goes back: after the reverse steps of a block of
J ("jump") grid steps from t_k0 to t_k1, the state is re-noised by the forward transition of
the SDE (which, for a linear SDE, is Gaussian and exact over any interval),

    x_{t_k0} = (gamma_k0 / gamma_k1) x_{t_k1} + sqrt(std_k0^2 - (gamma_k0 / gamma_k1)^2 std_k1^2) z,   (2)

and the block is done again, U ("resample") times in all, so that the unknown entries are
denoised again next to known entries they have had time to agree with. With J = 1 this is
Algorithm 1 (re-noise x_{t-1} -> x_t, redo the step); the last block, which ends at t_min, is
not resampled (Algorithm 1's "t > 1"). U = 1 is eq. (1) alone, with the same random draws.
Eq. (2) holds for every linear SDE: x_t | x_s is N(Phi x_s, Sigma) with Phi = gamma_t / gamma_s
and, since the marginals from the data are Var_t = Phi^2 Var_s + Sigma,
Sigma = std_t^2 - Phi^2 std_s^2. Cost: about U times the score evaluations of U = 1.

Shapes: y (B, ...) the images holding the known values (anything where m = 0), m the mask,
1 = known, 0 = to fill, of shape y.shape or y.shape[1:] (one mask for the batch); values
exactly 0 or 1 (bool accepted). The reverse step is Euler-Maruyama ("em") or the stochastic
Heun step ("heun") of refdiff.solvers on the time grid of refdiff.solvers.time_grid; the last
step adds no noise; `denoise=True` then applies Tweedie's formula once at t_min (as
refdiff.ddpm.em_vp).

Must hold (tests/test_inpaint.py): known entries exact; an all-known mask returns y; with the
exact score of a two-image data set the filled entries are those of the image the known
entries come from; resample = 1 is the plain replacement bit for bit (any jump); eq. (2)
leaves the SDE's marginals unchanged (tests/test_inpaint_resample.py).
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


def forward_transition(sde, x, t_from, t_to, rng):
    """Eq. (2): a draw of x_{t_to} given x_{t_from} = x under the forward SDE, t_to > t_from."""
    g0, s0 = (float(c) for c in sde.marginal_coeffs(np.float64(t_from)))
    g1, s1 = (float(c) for c in sde.marginal_coeffs(np.float64(t_to)))
    phi = g1 / g0
    return phi * x + math.sqrt(max(s1 * s1 - phi * phi * s0 * s0, 0.0)) * rng.standard_normal(x.shape)


def check_resampling(resample, jump):
    """RePaint's U (`resample`, >= 1) and J (`jump`, >= 1): ValueError naming the bad one."""
    check_int(resample, "resample", lo=1)
    check_int(jump, "jump", lo=1)


def inpaint(sde, score_fn, y, mask, steps, rng, t_min=1e-3, spacing="squared", step="em", denoise=False,
            resample=1, jump=1):
    """Fill the entries of y where mask = 0 by eq. (1), each block of `jump` steps done `resample`
    times with eq. (2) between (RePaint); -> x (y.shape) with x = y where mask = 1."""
    y = check_array_float(y, "y")
    if y.ndim < 2 or y.shape[0] < 1:
        raise ValueError(f"y must have shape (B, ...) with B >= 1; got {y.shape}")
    m = check_mask(mask, y.shape)
    if step not in STEPS:
        raise ValueError(f"step must be one of {STEPS}; got {step!r}")
    check_resampling(resample, jump)
    check_rng(rng)
    ts = solvers.time_grid(sde, steps, t_min, spacing)
    b, sigma = solvers._reverse_fields(sde, score_fn)
    one_step = solvers.em_step if step == "em" else solvers.stochastic_heun_step
    x = sde.prior_sample(y.shape, rng)
    for k0 in range(0, steps, jump):
        k1 = min(k0 + jump, steps)
        for u in range(resample if k1 < steps else 1):      # the last block is not resampled
            if u > 0:
                x = forward_transition(sde, x, ts[k1], ts[k0], rng)                          # (2)
            for k in range(k0, k1):
                gamma, std = (float(c) for c in sde.marginal_coeffs(np.float64(ts[k])))
                x = m * (gamma * y + std * rng.standard_normal(y.shape)) + (1 - m) * x         # (1)
                h = ts[k] - ts[k + 1]
                dW = math.sqrt(h) * rng.standard_normal(y.shape) if k < steps - 1 else 0.0
                x = one_step(b, sigma, x, ts[k], ts[k + 1], dW)
    if denoise:
        gamma = float(sde.marginal_coeffs(np.float64(ts[-1]))[0])
        x = solvers.data_prediction(sde, score_fn, m * gamma * y + (1 - m) * x, ts[-1])
    return m * y + (1 - m) * x


def inpaint_from_checkpoint(model, meta, images, mask, rng, steps=1000, step="em", batch=256, resample=1, jump=1):
    """`inpaint` with an eps-model checkpoint (refdiff.checkpoint.load_model) on the VP SDE of its
    DDPM chain (refdiff.solvers.continuous_sde), from T = 1 to 1e-3 on the uniform grid with a
    final Tweedie step, as refdiff.ddpm.em_vp; `batch` images at a time; RePaint's `resample`
    and `jump` as `inpaint`. images (n, ...) in [-1, 1] and mask (n, ...) or (...) as `inpaint`;
    returns x (images.shape) float64."""
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
    check_resampling(resample, jump)
    sf, outs = score_fn_from_model(model, sde), []
    for start in range(0, images.shape[0], batch):
        y, mb = images[start:start + batch], m[start:start + batch]
        shp = (len(y),) + shape1
        x = inpaint(sde, sf, y.reshape(shp), mb.reshape(shp), steps, rng, t_min=1e-3, spacing="uniform",
                    step=step, denoise=True, resample=resample, jump=jump)
        outs.append(x.reshape(y.shape))
    return np.concatenate(outs)


__all__ = ["STEPS", "check_mask", "check_resampling", "forward_transition", "inpaint", "inpaint_from_checkpoint"]
