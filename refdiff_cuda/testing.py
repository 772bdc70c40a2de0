"""Agreement of a backend with the reference: one helper, one tolerance table.

    check_op(op, backend, inputs, dtype, kwargs=None, seed=0)

runs the reference pair and the backend's pair of `op` (a name of refdiff_cuda.PAIRS) on
the same inputs (host arrays; cast to `dtype`, moved with backend.asarray), draws a random
upstream gradient dy (never ones: ones hides transposition bugs), and compares the forward
output and every gradient with `assert_agree`, which fails naming the op, the backend and
its version, the tensor and the worst entry. Single-function ops (time_embedding,
adam_update, ddpm_step, em_step) have their own small wrappers below.

Tolerance: |fast - ref| <= atol * scale + rtol * |ref| entrywise, where scale = max |ref|
over the tensor (so that atol is relative to the tensor's magnitude: inputs may be 1e-3 or
1e3 without a new tolerance). Why these values:
  float64  both sides compute the same formula in a different order (BLAS blocking,
           parallel reductions, float64 accumulators): error <= n u max|terms| with
           u = 1.1e-16 and n <= 1e4 terms in the tests -> 1e-12; rtol 1e-10, atol 1e-11
           leave a 10x margin and still catch any wrong index or term (those err at O(1)).
  float32  same argument with u = 6e-8: a sum of n terms in another order errs by about
           sqrt(n) u |terms| on average and n u |terms| at worst; n <= 1e4 gives 6e-6 ..
           6e-4 relative to the largest term. rtol 1e-4, atol 2e-5 (of max |ref|).
           Also covers libm tanhf vs NumPy's SIMD tanh (<= 2 ulp) and float64 vs
           float32 accumulation of sums (the backends accumulate in float64).
  "train32" / "train64": after k optimiser steps in the golden test, differences grow with
           the steps (Adam divides by sqrt(v): a gradient off by delta moves a parameter by
           up to lr delta / sqrt(v)); measured growth is below 10x over 10 steps, so 10x
           the per-op tolerance.
"""
from __future__ import annotations

import numpy as np

from refdiff_cuda import PAIRS, reference_namespace

TOL = {
    np.dtype(np.float64): dict(rtol=1e-10, atol=1e-11),
    np.dtype(np.float32): dict(rtol=1e-4, atol=2e-5),
    "train64": dict(rtol=1e-9, atol=1e-10),
    "train32": dict(rtol=1e-3, atol=2e-4),
}
REF = reference_namespace()


def assert_agree(actual, expected, tol, name):
    """Entrywise |a - e| <= atol * max|e| + rtol * |e|; NaN/Inf must match exactly."""
    a, e = np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    if a.shape != e.shape:
        raise AssertionError(f"{name}: shape {a.shape} != reference {e.shape}")
    fin = np.isfinite(e)
    if not np.array_equal(np.isfinite(a), fin) or not np.array_equal(a[~fin], e[~fin], equal_nan=True):
        i = np.unravel_index(np.argmax(np.isfinite(a) != fin), a.shape) if a.size else ()
        raise AssertionError(f"{name}: non-finite entries differ, e.g. at {i}: got {a[i]}, reference {e[i]}")
    if not fin.any():
        return
    scale = np.abs(e[fin]).max()
    err = np.where(fin, np.abs(a - e), 0)
    bound = tol["atol"] * scale + tol["rtol"] * np.abs(np.where(fin, e, 0))
    bad = err > bound
    if bad.any():
        i = np.unravel_index(np.argmax(err - bound), err.shape)
        raise AssertionError(f"{name}: {int(bad.sum())} of {bad.size} entries off; worst at {i}: got "
                             f"{a[i]:.10g}, reference {e[i]:.10g} (|diff| {err[i]:.3g} > atol {tol['atol']} x "
                             f"max|ref| {scale:.3g} + rtol {tol['rtol']} x |ref|)")


def _tol(dtype):
    return TOL[np.dtype(dtype)]


def _label(op, backend):
    return f"{op} [{backend.name} v{backend.versions.get(op, '?')}]"


def _cast(a, dtype):
    return None if a is None else np.asarray(a, dtype=dtype)


def check_op(op, backend, inputs, dtype, kwargs=None, seed=0, array_args=None):
    """Forward and backward of pair `op`: backend vs reference, in `dtype`.

    inputs: the positional arguments of <op>_forward (arrays are cast to dtype; None,
    ints and lists of arrays pass through). kwargs: keyword hyper-parameters.
    Returns the reference outputs (y, grads) for further checks.
    """
    fwd_name, bwd_name = PAIRS[op]
    kwargs = kwargs or {}
    conv = lambda a, f: [f(x) for x in a] if isinstance(a, list) else (f(a) if isinstance(a, np.ndarray) else a)
    host = [conv(a, lambda x: _cast(x, dtype)) for a in inputs]
    dev = [conv(a, lambda x: backend.asarray(x)) for a in host]
    y_ref, c_ref = getattr(REF, fwd_name)(*host, **kwargs)
    y_dev, c_dev = getattr(backend, fwd_name)(*dev, **kwargs)
    label, tol = _label(op, backend), _tol(dtype)
    if op == "mse":
        assert_agree(y_dev, y_ref, tol, f"{label} loss")
        assert_agree(backend.to_numpy(backend.mse_backward(c_dev)), REF.mse_backward(c_ref), tol, f"{label} dpred")
        return y_ref, None
    assert_agree(backend.to_numpy(y_dev), y_ref, tol, f"{label} forward")
    assert np.asarray(backend.to_numpy(y_dev)).dtype == y_ref.dtype, f"{label}: dtype {y_dev.dtype} != {y_ref.dtype}"
    dy = np.random.default_rng(seed).standard_normal(y_ref.shape).astype(y_ref.dtype)
    if y_ref.dtype == bool:
        return y_ref, None
    g_ref = getattr(REF, bwd_name)(dy, c_ref)
    g_dev = getattr(backend, bwd_name)(backend.asarray(dy), c_dev)
    g_ref = g_ref if isinstance(g_ref, (tuple, list)) else (g_ref,)
    g_dev = g_dev if isinstance(g_dev, (tuple, list)) else (g_dev,)
    assert len(g_ref) == len(g_dev), f"{label}: {len(g_dev)} gradients, reference has {len(g_ref)}"
    for k, (a, e) in enumerate(zip(g_dev, g_ref)):
        if e is None:
            assert a is None, f"{label}: gradient {k} should be None"
            continue
        assert_agree(backend.to_numpy(a), e, tol, f"{label} gradient {k}")
    return y_ref, g_ref


def check_function(op, backend, inputs, dtype, kwargs=None):
    """Single-function ops whose result is an array: time_embedding, ddpm_step, em_step."""
    host = [_cast(a, dtype) if isinstance(a, np.ndarray) else a for a in inputs]
    dev = [backend.asarray(a) if isinstance(a, np.ndarray) else a for a in host]
    ref = getattr(REF, op)(*host, **(kwargs or {}))
    got = backend.to_numpy(getattr(backend, op)(*dev, **(kwargs or {})))
    assert_agree(got, ref, _tol(dtype), f"{_label(op, backend)} result")
    assert np.asarray(got).dtype == ref.dtype, f"{_label(op, backend)}: dtype {got.dtype} != {ref.dtype}"


def check_adam(backend, shape, dtype, steps=3, weight_decay=0.0, seed=0):
    """adam_update in place over `steps` steps with fresh gradients: p, m, v must agree."""
    rng = np.random.default_rng(seed)
    p = rng.standard_normal(shape).astype(dtype)
    state_ref = [p.copy(), np.zeros_like(p), np.zeros_like(p)]
    state_dev = [backend.asarray(a.copy()) for a in state_ref]
    for step in range(1, steps + 1):
        g = (rng.standard_normal(shape) * 10.0 ** rng.integers(-6, 3)).astype(dtype)
        REF.adam_update(*state_ref[:1], g, *state_ref[1:], 1e-3, 0.9, 0.999, 1e-8, step, weight_decay)
        backend.adam_update(state_dev[0], backend.asarray(g), state_dev[1], state_dev[2], 1e-3, 0.9, 0.999,
                            1e-8, step, weight_decay)
    for name, a, e in zip("pmv", state_dev, state_ref):
        assert_agree(backend.to_numpy(a), e, _tol(dtype), f"{_label('adam_update', backend)} {name}")
