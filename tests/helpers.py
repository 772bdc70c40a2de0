"""Shared test helpers: finite-difference gradient checks and the tolerance table.

Tolerances are `atol + rtol * |ref|` (llm.c's rule). Why these values:
- float64 finite differences, central, h = 1e-6: truncation error O(h^2 |f'''|) ~ 1e-12
  and rounding error O(eps_64 |f| / h) ~ 1e-10 relative; 1e-6 leaves a wide margin for
  sums over a few thousand terms but still catches any wrong index or missing term
  (those err at O(1)).
- float32 vs float64 agreement of the same computation: eps_32 = 1.2e-7 times the
  condition of a reduction of up to ~1e4 terms -> ~1e-4 relative.
"""
from __future__ import annotations

import numpy as np

TOL = {
    "fd64": dict(rtol=1e-6, atol=1e-8),       # finite differences in float64 (see above)
    np.dtype(np.float64): dict(rtol=1e-10, atol=1e-12),  # same maths, other op order, float64
    np.dtype(np.float32): dict(rtol=1e-4, atol=1e-5),    # same maths, other op order, float32
}


def numerical_grad(f, x, h=1e-6, diff=None):
    """Central differences of the scalar function f() with respect to array x (in place):
    (f(x + h) - f(x - h)) / 2h per entry, or diff(f(x + h), f(x - h)) / 2h when f returns
    something else (see numerical_vjp)."""
    g = np.zeros_like(x, dtype=np.float64)
    it = np.nditer(x, flags=["multi_index"])
    for _ in it:
        i = it.multi_index
        old = x[i]
        x[i] = old + h
        fp = f()
        x[i] = old - h
        fm = f()
        x[i] = old
        g[i] = (fp - fm if diff is None else diff(fp, fm)) / (2 * h)
    return g


def numerical_vjp(fy, dy, x, h=1e-6):
    """Central differences of L = sum(fy() * dy) with respect to x (in place), differencing
    the outputs before the sum: sum((y(x+h) - y(x-h)) dy) / 2h. Outputs the perturbation
    does not touch cancel exactly, so the rounding error scales with the entries that
    change, not with |L| (summing first left ~1e-8 of noise on 1,000-entry outputs)."""
    return numerical_grad(lambda: np.array(fy(), dtype=np.float64), x, h,
                          diff=lambda yp, ym: np.sum((yp - ym) * dy))


def assert_close(actual, expected, rtol, atol, name="value"):
    actual, expected = np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != {expected.shape}"
    err = np.abs(actual - expected)
    bound = atol + rtol * np.abs(expected)
    bad = err > bound
    if bad.any():
        i = np.unravel_index(np.argmax(err - bound), err.shape)
        raise AssertionError(f"{name}: {bad.sum()} of {bad.size} entries off; worst at {i}: "
                             f"got {actual[i]:.10g}, expected {expected[i]:.10g} "
                             f"(|diff| {err[i]:.3g} > atol {atol} + rtol {rtol} * |expected|)")


def check_grads(forward, backward, inputs, rng, tol=TOL["fd64"], h=1e-6):
    """Gradient check of an op pair against central finite differences, in float64.

    forward(*inputs) -> (y, cache); backward(dy, cache) -> grads (one per input, or a
    single array for one input). Uses a random upstream gradient dy (never ones, which
    hides transposition bugs) and the scalar L = sum(y * dy).
    """
    inputs = [np.asarray(a, dtype=np.float64).copy() for a in inputs]
    y, cache = forward(*inputs)
    dy = rng.standard_normal(y.shape)
    grads = backward(dy, cache)
    if not isinstance(grads, (tuple, list)):
        grads = (grads,)
    assert len(grads) >= len(inputs)
    for k, a in enumerate(inputs):
        num = numerical_vjp(lambda: forward(*inputs)[0], dy, a, h)
        assert_close(grads[k], num, name=f"grad of input {k}", **tol)
