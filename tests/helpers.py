"""Shared test helpers: the hypothesis example budget, finite-difference checks with a
derived tolerance, value comparison against the one tolerance table.

Tolerance table: `refdiff_cuda.testing.TOL`, keyed by dtype, each entry with its reason
(`TOL[dtype].why`); `assert_close` here and `assert_agree` there are the same rule,
|actual - expected| <= atol * max|expected| + rtol * |expected|.

Finite differences (every FD test goes through `fd_grad` / `fd_vjp` / `fd_tangent` and
`assert_fd`): the central difference (f(x+h) - f(x-h)) / 2h of a float64 function errs by

    truncation  h^2 |f'''| / 6         -> FD_RTOL * |f'|: relative (h / L)^2 / 6 for a
                                          function whose derivative changes by its own size
                                          over a length L; L >= 1e-3 here, so 1e-6 covers it
    rounding    FD_ROUND u |f| / h      -> each evaluation of f is off by a few ulps of the
                                          values it sums (u = 2.2e-16); FD_ROUND = 8 ulps

where |f| is the scale of the values that the perturbation touches, measured per entry:
|f| itself; for a sum, the sum of its terms' magnitudes (`inner`); for a vector-Jacobian
product, sum |y_i dy_i| over the outputs that changed plus the largest one (outputs it does
not touch cancel exactly); or a larger scale the test declares, with its reason, where f
subtracts intermediates larger than its result (log-sum-exp of large logits, a loss that
itself takes finite differences). A wrong index or a missing term errs at O(|f'|), far above
both. This replaced a fixed atol of 1e-8, which a cross-entropy of logits of scale 30
(|L dy| ~ 160, rounding floor ~ 1e-8) failed at random.
"""
from __future__ import annotations

import os

import numpy as np

from refdiff_cuda.testing import TOL, Tol, assert_agree  # noqa: F401  (re-exported: one table)

FD_STEP = 1e-6
FD_RTOL = 1e-6
FD_ROUND = 8
EPS64 = float(np.finfo(np.float64).eps)

# --- hypothesis: the profile decides how many examples each property test draws ---------------------
PROFILES = {"ci": 1, "dev": 1, "thorough": 20}     # name -> multiplier of each test's example budget


def hypothesis_profile():
    """HYPOTHESIS_PROFILE if set, else "ci" when the CI variable is set, else "dev"."""
    name = os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if os.environ.get("CI") else "dev")
    if name not in PROFILES:
        raise ValueError(f"HYPOTHESIS_PROFILE must be one of {sorted(PROFILES)}; got {name!r}")
    return name


def examples(n):
    """The example budget of a property test: n, times 20 under HYPOTHESIS_PROFILE=thorough."""
    return n * PROFILES[hypothesis_profile()]


# --- tiny UNets: between them every code path of the UNet and its JVP --------------------------------
# odd sizes (7 -> 3 -> 1: the Conv(2,1)+Conv(4,2,1) resampling) and even ones (4 -> 2 -> 1), 1..3
# blocks per stage, groups of one and of several channels, the last norm skipped or applied, an
# odd emb_dim, the input skip (no input norm, x added to the output). time_scale = 0.5 suits t in
# (0, 1]; tests that feed DDPM steps 1..1000 scale it down.
TINY_UNETS = {
    "odd": dict(in_channels=2, image_size=7, channels=[2, 4], blocks=2, mid_channels=3, emb_dim=4,
                time_scale=0.5, max_groups=2, final_norm=False),
    "even": dict(in_channels=1, image_size=4, channels=[4, 2], blocks=3, mid_channels=2, emb_dim=3,
                 time_scale=0.5, max_groups=4, final_norm=True),
    "skip": dict(in_channels=1, image_size=6, channels=[2, 4], blocks=1, mid_channels=2, emb_dim=4,
                 time_scale=0.5, max_groups=2, final_norm=False, input_norm=False, input_skip=True),
    "flat": dict(in_channels=1, image_size=4, channels=[2, 2], blocks=1, mid_channels=2, emb_dim=3,
                 time_scale=0.5, max_groups=2, final_norm=True),
}


# --- value comparison ------------------------------------------------------------------------------
def assert_close(actual, expected, rtol, atol, name="value"):
    """|actual - expected| <= atol * max|expected| + rtol * |expected| entrywise (atol is
    relative to the tensor's magnitude, as in refdiff_cuda.testing); NaN/inf must match."""
    assert_agree(actual, expected, dict(rtol=rtol, atol=atol), name)


def assert_grads_close(got, ref, tol, name="grad"):
    """Every gradient tensor of a model (dicts name -> array) against a reference within
    `tol`, atol relative to the largest gradient of the whole model: a tensor that is zero in
    exact arithmetic (a time-MLP bias right before a per-channel GroupNorm) is rounding noise
    of the others, whatever its own scale."""
    largest = max(float(np.abs(np.asarray(r, np.float64)).max(initial=0.0)) for r in ref.values())
    for k, r in ref.items():
        assert_agree(got[k], r, dict(rtol=tol["rtol"], atol=0.0), f"{name} {k}", slack=tol["atol"] * largest)


def assert_zero(actual, scale, name="value", ulps=16):
    """A result that is exactly zero in exact arithmetic: |actual| <= ulps u scale, scale the
    magnitude of the values it is computed from."""
    worst = float(np.abs(np.asarray(actual, np.float64)).max(initial=0.0))
    assert worst <= ulps * EPS64 * scale, f"{name}: |value| up to {worst:.3g}, not zero to {ulps} ulps of {scale:.3g}"


# --- finite differences ----------------------------------------------------------------------------
def inner(*pairs):
    """sum(y * dy) over the pairs (y1, dy1, y2, dy2, ...), with the scale of its terms,
    sum |y * dy|: a scalar function for fd_grad whose rounding is that of its terms, not of
    its (possibly cancelling) sum."""
    terms = [np.asarray(y, np.float64) * np.asarray(dy, np.float64) for y, dy in zip(pairs[::2], pairs[1::2])]
    return float(sum(np.sum(t) for t in terms)), float(sum(np.sum(np.abs(t)) for t in terms))


def _value_and_scale(out, scale):
    """f() may return a value or (value, scale of the values it sums); a declared scale
    (intermediates larger than the result) raises it."""
    v, s = out if isinstance(out, tuple) else (out, None)
    v = float(v)
    return v, max(abs(v) if s is None else s, scale or 0.0)


def _central(f, x, h, diff):
    """Central differences over each entry of x (perturbed in place, then restored);
    diff(f(x + h), f(x - h)) -> (difference, scale of the values). Returns (derivative,
    rounding bound FD_ROUND u scale / h) per entry."""
    g = np.zeros(x.shape, dtype=np.float64)
    scale = np.zeros(x.shape, dtype=np.float64)
    it = np.nditer(x, flags=["multi_index"])
    for _ in it:
        i = it.multi_index
        old = x[i]
        x[i] = old + h
        fp = f()
        x[i] = old - h
        fm = f()
        x[i] = old
        g[i], scale[i] = diff(fp, fm)
    return g / (2 * h), FD_ROUND * EPS64 * scale / h


def fd_grad(f, x, h=FD_STEP, scale=None):
    """Central differences of the scalar f() with respect to array x (perturbed in place).
    f() returns a value, or (value, scale of its terms) as `inner` does; `scale` declares
    intermediates larger than both (say why at the call). Returns (gradient, rounding bound
    per entry)."""
    def diff(fp, fm):
        (vp, sp), (vm, sm) = _value_and_scale(fp, scale), _value_and_scale(fm, scale)
        return vp - vm, max(sp, sm)
    return _central(f, x, h, diff)


def fd_vjp(fy, dy, x, h=FD_STEP, scale=None):
    """Central differences of L = sum(fy() * dy) with respect to x, differencing the outputs
    before the sum: sum((y(x+h) - y(x-h)) dy) / 2h. Outputs the perturbation does not touch
    cancel exactly, so the rounding bound is the sum of |y dy| over the outputs that change
    (plus the largest |y dy|), or `scale` if larger.
    Returns (gradient, rounding bound per entry)."""
    def diff(yp, ym):
        yp, ym = np.asarray(yp, dtype=np.float64), np.asarray(ym, dtype=np.float64)
        size = np.maximum(np.abs(yp), np.abs(ym)) * np.abs(dy)
        # outputs that changed, plus the largest one: an output may depend on x by less than
        # its own ulp (a saturated softmax) and then not change at all
        return float(np.sum((yp - ym) * dy)), max(float(np.sum(size[yp != ym]) + size.max(initial=0.0)), scale or 0.0)
    return _central(fy, x, h, diff)


def fd_tangent(fy, x, v, h=FD_STEP, scale=None):
    """(y(x + h v) - y(x - h v)) / 2h, the directional derivative of fy(x) along v, and its
    rounding bound per output entry (from |y|, or the declared intermediate `scale` per
    entry where larger)."""
    yp, ym = np.asarray(fy(x + h * v), np.float64), np.asarray(fy(x - h * v), np.float64)
    size = np.maximum(np.abs(yp), np.abs(ym))
    if scale is not None:
        size = np.maximum(size, scale)
    return (yp - ym) / (2 * h), FD_ROUND * EPS64 * size / h


def fd_direction(f, x, v, h=FD_STEP, scale=None):
    """(f(x + h v) - f(x - h v)) / 2h for the scalar f() of array x (perturbed in place, then
    restored): the derivative along v, two evaluations instead of two per entry. f() as in
    fd_grad. Returns (derivative, rounding bound)."""
    x += h * v
    vp, sp = _value_and_scale(f(), scale)
    x -= 2 * h * v
    vm, sm = _value_and_scale(f(), scale)
    x += h * v
    return (vp - vm) / (2 * h), FD_ROUND * EPS64 * max(sp, sm) / h


def fd_joint_direction(f, arrays, deltas, h=FD_STEP, scale=None):
    """fd_direction with several arrays moved at once: (f(a + h d) - f(a - h d)) / 2h, every
    arrays[k] perturbed in place by deltas[k] (then restored): the derivative along one joint
    direction, two evaluations for all the arrays. Returns (derivative, rounding bound)."""
    def at(step):
        for k, d in deltas.items():
            arrays[k] += step * d
        return _value_and_scale(f(), scale)
    (vp, sp), (vm, sm) = at(h), at(-2 * h)
    at(h)
    return (vp - vm) / (2 * h), FD_ROUND * EPS64 * max(sp, sm) / h


def assert_fd(analytic, fd, name="gradient"):
    """analytic vs a finite-difference result (value, rounding bound) from fd_grad / fd_vjp /
    fd_tangent: |analytic - num| <= FD_RTOL |num| + bound, entrywise."""
    num, bound = fd
    a = np.asarray(analytic, dtype=np.float64)
    num = np.asarray(num, dtype=np.float64)
    assert a.shape == num.shape, f"{name}: shape {a.shape} != finite differences {num.shape}"
    err = np.abs(a - num)
    allowed = FD_RTOL * np.abs(num) + bound
    bad = ~(err <= allowed)
    if bad.any():
        i = np.unravel_index(np.argmax(np.where(bad, err - allowed, -np.inf)), err.shape) if err.ndim else ()
        raise AssertionError(f"{name}: {int(bad.sum())} of {bad.size} entries off finite differences; worst at "
                             f"{i}: got {a[i]:.10g}, FD {num[i]:.10g} (|diff| {err[i]:.3g} > {FD_RTOL} x |FD| + "
                             f"rounding {np.broadcast_to(bound, err.shape)[i]:.3g})")


def numerical_grad(f, x, h=FD_STEP):
    """The gradient alone (for callers that reduce it further, e.g. a directional derivative)."""
    return fd_grad(f, x, h)[0]


def check_grads(forward, backward, inputs, rng, h=FD_STEP, scale=None):
    """Gradient check of an op pair against central finite differences, in float64.

    forward(*inputs) -> (y, cache); backward(dy, cache) -> grads (one per input, or a
    single array for one input). Uses a random upstream gradient dy (never ones, which
    hides transposition bugs) and the scalar L = sum(y * dy). scale: the largest intermediate
    value of forward where it exceeds the outputs (per unit of dy; see fd_vjp).
    """
    inputs = [np.asarray(a, dtype=np.float64).copy() for a in inputs]
    y, cache = forward(*inputs)
    dy = rng.standard_normal(np.shape(y))
    grads = backward(dy, cache)
    if not isinstance(grads, (tuple, list)):
        grads = (grads,)
    assert len(grads) >= len(inputs)
    for k, a in enumerate(inputs):
        assert_fd(grads[k], fd_vjp(lambda: forward(*inputs)[0], dy, a, h,
                                       None if scale is None else scale * float(np.abs(dy).max())), name=f"grad of input {k}")


def trained_mlp_checkpoint(path, steps, rows, model_kw, **meta):
    """A small MLP after `steps` Adam + EMA updates on a constant batch of `rows` points,
    saved with its EMA and optimizer to `path` (meta as save_model's keywords);
    -> (model, optimizer, ema)."""
    from refdiff import checkpoint
    from refdiff.nn import make_model
    from refdiff.optim import EMA, Adam

    m = make_model("mlp", dim=2, seed=1, **model_kw)
    opt, ema = Adam(m, lr=1e-2), EMA(m, 0.9)
    x, t = np.ones((rows, 2), np.float32), np.full(rows, 0.3, np.float32)
    for _ in range(steps):
        m.zero_grad()
        m.backward(m.forward(x, t))
        opt.step()
        ema.update()
    checkpoint.save_model(path, m, ema=ema, optimizer=opt, **meta)
    return m, opt, ema
