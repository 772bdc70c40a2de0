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
  noise floor: a tensor whose float64 reference is no larger than the rounding of the terms
           it is computed from carries no digits to compare relatively (scale = max|ref|
           may even be 0). check_op then asks both sides to be rounding noise: every entry
           within noise = 4 u x (terms), u = eps / 2 of the compared dtype, terms = max |x|
           over the float inputs for the forward and max |dy| x (1 + max |x|) for a
           gradient. Why that size: the reference's sigmoid s = (1 + tanh(x/2)) / 2 cancels
           in 1 + tanh, so s has an absolute (not relative) error up to u, and y = x s one
           up to u |x|; dx = dy (s + x s (1 - s)) one up to u |dy| (1 + |x|); x4 as for the
           slack (another valid rounding order). Case: silu of float32 inputs all in
           [-88, -60] is -0 in the reference (tanh rounds to -1 in float64 too) and
           x e^x ~ -5e-25 in numba's version 3, which keeps e^x: both are noise next to
           u |x| ~ 5e-6, and the relative test with max|ref| = 0 allowed no difference at
           all. The floor changes nothing where the reference exceeds it, so it loosens no
           comparison of a tensor that carries signal: a wrong index or term errs at the
           size of the terms, far above 4 u of them.
  "train32" / "train64": 10 training steps in the golden test: differences compound over
           the steps (a gradient off by delta moves a parameter by up to lr delta / sqrt(v)
           through Adam, and every later gradient sees that), so 10x the per-op tolerance.
           Measured worst (numba v1 and v2, err / max|ref| of the tensor): 1.1e-4 in
           float32, 3.6e-13 in float64.
"""
from __future__ import annotations

import copy

import numpy as np

from refdiff_cuda import PAIRS, reference_namespace

class Tol(dict):
    """A tolerance {rtol, atol} (usable as **kwargs and tol["atol"]) with its reason, `.why`."""

    def __init__(self, rtol, atol, why):
        super().__init__(rtol=rtol, atol=atol)
        self.why = why


# The one tolerance table of the project's tests (tests/helpers.py re-exports it); finite
# differences have their own derived bound (tests/helpers.py: fd_grad, assert_fd).
TOL = {
    np.dtype(np.float64): Tol(1e-10, 1e-11, "same formula in another order in float64: n u max|terms| "
                                            "with n <= 1e4, u = 1.1e-16 -> 1e-12; 10x margin"),
    np.dtype(np.float32): Tol(1e-4, 2e-5, "same formula in another order in float32: sqrt(n) u .. n u "
                                          "of the largest term, n <= 1e4, u = 6e-8; libm vs SIMD tanh"),
    "train64": Tol(1e-9, 1e-10, "10 Adam steps in float64: per-op differences compound, 10x the op's"),
    "train32": Tol(1e-3, 2e-4, "10 Adam steps in float32: per-op differences compound, 10x the op's "
                               "(measured worst 1.1e-4)"),
}
REF = reference_namespace()


def assert_agree(actual, expected, tol, name, slack=0.0, noise=0.0):
    """Entrywise |a - e| <= atol * max|e| + rtol * |e| + slack; NaN/Inf must match exactly.

    noise: the rounding level of the terms `expected` is computed from (module docstring).
    When max|e| <= noise, the reference is rounding noise and atol * max|e| is replaced by
    noise: the actual tensor must be noise-sized too. Above it, noise plays no part.
    """
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
    floor = noise if scale <= noise else tol["atol"] * scale
    bound = floor + tol["rtol"] * np.abs(np.where(fin, e, 0)) + slack
    bad = err > bound
    if bad.any():
        i = np.unravel_index(np.argmax(err - bound), err.shape)
        raise AssertionError(f"{name}: {int(bad.sum())} of {bad.size} entries off; worst at {i}: got "
                             f"{a[i]:.10g}, reference {e[i]:.10g} (|diff| {err[i]:.3g} > "
                             + (f"noise {noise:.3g}" if scale <= noise else f"atol {tol['atol']} x max|ref| {scale:.3g}")
                             + f" + rtol {tol['rtol']} x |ref| + slack {slack:.3g})")


def _tol(dtype):
    return TOL[np.dtype(dtype)]


def _label(op, backend):
    return f"{op} [{backend.name} v{backend.versions.get(op, '?')}]"


def _cast(a, dtype):
    return None if a is None else np.asarray(a, dtype=dtype)


def _fresh(a):
    """A numpy Generator among the inputs (dropout's rng) is copied for each run, so that
    every run (the reference's, in each dtype, and the backend's) draws the same numbers."""
    return copy.deepcopy(a) if isinstance(a, np.random.Generator) else a


def _run_ref(op, inputs, dtype, kwargs, dy=None):
    conv = lambda a, f: [f(x) for x in a] if isinstance(a, list) else (f(a) if isinstance(a, np.ndarray) else a)
    host = [conv(a, lambda x: _cast(x, dtype)) for a in inputs]
    fwd, bwd = PAIRS[op]
    y, cache = getattr(REF, fwd)(*[_fresh(a) for a in host], **kwargs)
    if op == "mse":
        return host, y, (REF.mse_backward(cache),)
    if dy is None or y.dtype == bool:
        return host, y, None
    g = getattr(REF, bwd)(dy.astype(y.dtype), cache)
    return host, y, (tuple(g) if isinstance(g, (tuple, list)) else (g,))


def check_op(op, backend, inputs, dtype, kwargs=None, seed=0):
    """Forward and backward of pair `op`: backend vs reference, in `dtype`.

    inputs: the positional arguments of <op>_forward (arrays are cast to dtype; None,
    ints and lists of arrays pass through). kwargs: keyword hyper-parameters.

    float64: the backend must match the float64 reference within TOL[float64].
    float32: the backend (in float32) is compared with the reference evaluated in float64
    on the same float32 inputs, within TOL[float32] plus slack = 4 x the float32
    reference's own largest error on that tensor: a kernel must be accurate, or at least no
    less accurate than the reference (x4: another, equally valid rounding order). This keeps
    ill-conditioned cases (group norm of inputs with a large mean) honest without loosening
    the table. A tensor whose reference is rounding noise of its terms (4 u max|x| for the
    forward, 4 u max|dy| (1 + max|x|) for a gradient; module docstring) must be noise on the
    backend's side too.
    """
    kwargs = kwargs or {}
    dtype = np.dtype(dtype)
    inputs32 = inputs
    if dtype == np.float32:     # round once: the float64 reference then sees the same inputs
        conv = lambda a: [_cast(x, dtype) for x in a] if isinstance(a, list) else (_cast(a, dtype) if isinstance(a, np.ndarray) else a)
        inputs32 = [conv(a) for a in inputs]
    host, y_ref, _ = _run_ref(op, inputs32, dtype, kwargs)
    # dy from its own stream: default_rng(seed) is also what op_case's arrays use for a drawn
    # seed, and once hypothesis drew seed 0 at scale 1e3, x = 1000 dy, so dy lay in the span a
    # group norm's backward projects out: dx was rounding noise on both sides, and compared so.
    dy = None if op == "mse" else np.random.default_rng([seed, 1]).standard_normal(np.shape(y_ref))
    _, y_ref, g_ref = _run_ref(op, inputs32, dtype, kwargs, dy)
    if dtype == np.float32:
        _, y_64, g_64 = _run_ref(op, inputs32, np.float64, kwargs, dy)
    else:
        y_64, g_64 = y_ref, g_ref
    conv = lambda a, f: [f(x) for x in a] if isinstance(a, list) else (f(a) if isinstance(a, np.ndarray) else a)
    dev = [_fresh(conv(a, backend.asarray)) for a in host]
    fwd_name, bwd_name = PAIRS[op]
    y_dev, c_dev = getattr(backend, fwd_name)(*dev, **kwargs)
    label, tol = _label(op, backend), _tol(dtype)
    u = np.finfo(dtype).eps / 2
    x_max = max([float(np.abs(x).max()) for a in inputs32 for x in (a if isinstance(a, list) else [a])
                 if isinstance(x, np.ndarray) and x.dtype.kind == "f" and x.size] or [0.0])

    def agree(got, r_dt, r_64, what, terms):
        got = np.asarray(backend.to_numpy(got)) if not np.isscalar(got) else got
        slack = 0.0
        if dtype == np.float32:
            d = np.abs(np.asarray(r_dt, np.float64) - np.asarray(r_64, np.float64))
            slack = 4 * float(d[np.isfinite(d)].max()) if np.isfinite(d).any() else 0.0
        assert_agree(got, r_64, tol, f"{label} {what}", slack, noise=4 * u * terms)
        if not np.isscalar(r_dt):
            assert got.dtype == np.asarray(r_dt).dtype, f"{label} {what}: dtype {got.dtype} != {np.asarray(r_dt).dtype}"

    agree(y_dev, y_ref, y_64, "forward", x_max)
    if op == "mse":
        agree(backend.mse_backward(c_dev), g_ref[0], g_64[0], "dpred", 0.0)
        return
    if g_ref is None:               # boolean outputs have no gradient
        return
    g_dev = getattr(backend, bwd_name)(backend.asarray(dy.astype(y_ref.dtype)), c_dev)
    g_dev = tuple(g_dev) if isinstance(g_dev, (tuple, list)) else (g_dev,)
    assert len(g_ref) == len(g_dev), f"{label}: {len(g_dev)} gradients, reference has {len(g_ref)}"
    for k, (a, r, r64) in enumerate(zip(g_dev, g_ref, g_64)):
        if r is None:
            assert a is None, f"{label}: gradient {k} should be None"
            continue
        agree(a, r, r64, f"gradient {k}", float(np.abs(dy).max()) * (1 + x_max))


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


# --- hypothesis strategies: one per op ------------------------------------------------------------
# Shapes include size-1 dims, odd sizes and batch 1; values include extremes: a scale drawn
# from 1e-3 .. 1e3 times standard normals, plus exact zeros. Group norm is the exception that
# is ill-conditioned by nature: |mean| / std multiplies the rounding of x itself (and its
# backward subtracts nearly equal terms), so two float32 implementations differ by about
# (|mean| / std) x 3e-6 relative; measured 3.4e-4 at |mean| / std = 100, past rtol. Its
# inputs keep |mean| / std <= 10 (offsets 0, 1, 10 standard deviations).
def _strategies():
    from hypothesis import strategies as st

    scale = st.sampled_from([1e-3, 1.0, 1e3])

    @st.composite
    def arrays(draw, shape):
        rng = np.random.default_rng(draw(st.integers(0, 2 ** 31)))
        a = rng.standard_normal(shape) * draw(scale)
        if draw(st.booleans()) and a.size:
            a.reshape(-1)[rng.integers(0, a.size, max(1, a.size // 4))] = 0.0
        return a

    @st.composite
    def case(draw, op, tiny=False):
        # tiny: for numba's CUDA simulator (every GPU thread is a Python thread)
        dim, small = (st.integers(1, 2), st.integers(1, 3)) if tiny else (st.integers(1, 4), st.integers(1, 7))
        hw = 4 if tiny else 8
        B, C = draw(dim), draw(dim)
        if op == "linear":
            D = draw(dim)
            return [draw(arrays((B, C))), draw(arrays((D, C))), draw(arrays((D,))) if draw(st.booleans()) else None], {}
        if op in ("silu", "relu"):
            return [draw(arrays((B, C) + tuple(draw(st.lists(small, max_size=2)))))], {}
        if op == "concat":
            H = draw(small)
            return [[draw(arrays((B, draw(dim), H, H))) for _ in range(draw(st.integers(1, 3)))]], {}
        if op == "add_channel_bias":
            return [draw(arrays((B, C) + tuple(draw(st.lists(small, max_size=2))))), draw(arrays((B, C)))], {}
        if op in ("conv2d", "conv_transpose2d"):
            k, s, p = draw(st.integers(1, 4)), draw(st.integers(1, 3)), draw(st.integers(0, 2))
            kw = k if draw(st.booleans()) else draw(st.integers(1, 4))      # square: conv2d's other dx branch
            if op == "conv2d":
                H, W = draw(st.integers(max(1, k - 2 * p), hw)), draw(st.integers(max(1, kw - 2 * p), hw))
                w = draw(arrays((draw(dim), C, k, kw)))
            else:
                lo = lambda kk: 1 + max(0, -((kk - 1 - 2 * p) // s))
                H, W = draw(st.integers(lo(k), max(lo(k), hw - 2))), draw(st.integers(lo(kw), max(lo(kw), hw - 2)))
                w = draw(arrays((C, draw(dim), k, kw)))
            cout = w.shape[0] if op == "conv2d" else w.shape[1]
            b = draw(arrays((cout,))) if draw(st.booleans()) else None
            return [draw(arrays((B, C, H, W))), w, b], dict(stride=s, padding=p)
        if op == "max_pool2d":
            k = draw(st.integers(1, 3))
            s = draw(st.integers(1, 3))
            H, W = draw(st.integers(k, hw)), draw(st.integers(k, hw))
            return [draw(arrays((B, C, H, W)))], dict(kernel_size=k, stride=s)
        if op in ("group_norm", "group_norm_silu"):
            G = draw(st.sampled_from([g for g in range(1, 5) if (C * draw(dim)) % g == 0] or [1]))
            C = G * draw(dim)
            shape = (B, C) + tuple(draw(st.lists(small, max_size=2)))
            if (C // G) * int(np.prod(shape[2:])) < 3:
                # a group of n <= 2 values normalises to +-1 (or 0) whatever x is: dx is exactly 0,
                # and comparing rounding noise with rounding noise says nothing. Keep n >= 3.
                shape = shape + (3,)
            rng = np.random.default_rng(draw(st.integers(0, 2 ** 31)))
            sd, off = draw(scale), draw(st.sampled_from([0.0, 1.0, 10.0]))
            x = (rng.standard_normal(shape) + off) * sd
            return [x, G, 1 + 0.5 * rng.standard_normal(C), rng.standard_normal(C)], {}
        if op == "spatial_attention":
            # Softmax multiplies the relative rounding error of a score s by |s| (dA = A (dS -
            # rowsum)): scores of 1e6 (q, k at 1e3) would be ill-conditioned like group norm
            # at large |mean| / std. q and k are kept at scale <= 3 (|s| <~ 40); v, which
            # enters linearly, takes every scale.
            heads, d, H, W = draw(st.integers(1, 3)), draw(dim), draw(small), draw(small)
            rng = np.random.default_rng(draw(st.integers(0, 2 ** 31)))
            qk = rng.standard_normal((B, 2 * heads * d, H, W)) * draw(st.sampled_from([1e-3, 1.0, 3.0]))
            return [np.concatenate([qk, draw(arrays((B, heads * d, H, W)))], axis=1)], dict(heads=heads)
        if op == "upsample_nearest2x":
            return [draw(arrays((B, C, draw(small), draw(small))))], {}
        if op == "dropout":
            p = draw(st.sampled_from([0.0, 0.1, 0.5, 0.9]))
            rng = np.random.default_rng(draw(st.integers(0, 2 ** 31)))
            return [draw(arrays((B, C) + tuple(draw(st.lists(small, max_size=2))))), p, rng], {}
        if op == "mse":
            shape = (B, C, draw(small))
            w = draw(arrays((B,))) ** 2 if draw(st.booleans()) else None
            return [draw(arrays(shape)), draw(arrays(shape)), w], {}
        raise KeyError(op)

    return case


def op_case(op, tiny=False):
    """Hypothesis strategy of (inputs, kwargs) for the pair `op` (see _strategies)."""
    return _strategies()(op, tiny)


# --- golden end-to-end comparison ------------------------------------------------------------------
def compare_training(losses, grads, golden, dtype, label, steps=None):
    """Losses and every gradient of every step vs the golden reference run; raises one
    AssertionError listing every tensor off (name, step, worst entry).

    Tolerance TOL["train32"/"train64"] with scale = max |golden| of the tensor, except for
    gradients that are zero in exact arithmetic and only rounding noise in the reference:
    (e.g. enc.0's time MLP, whose per-channel vector is added right before a GroupNorm with
    one channel per group, which removes it exactly). A tensor counts as such when its
    golden max is below noise = 1e3 u x (largest gradient of that step), u the unit
    roundoff; the backend must then be noise-sized too.
    """
    dtype = np.dtype(dtype)
    tol = TOL["train32" if dtype == np.float32 else "train64"]
    u = np.finfo(dtype).eps
    steps = len(golden["losses"]) if steps is None else steps
    problems = []
    try:
        assert_agree(np.asarray(losses[:steps]), golden["losses"][:steps], tol, f"{label} losses")
    except AssertionError as exc:
        problems.append(str(exc))
    for s in range(steps):
        ref = golden["grads"][s]
        if set(grads[s]) != set(ref):
            problems.append(f"{label} step {s}: gradient names differ: {sorted(set(grads[s]) ^ set(ref))[:5]}")
            continue
        noise = 1e3 * u * max(float(np.abs(v).max()) for v in ref.values())
        for name, r in ref.items():
            got = grads[s][name]
            if float(np.abs(r).max()) < noise:
                if float(np.abs(got).max()) > noise:
                    problems.append(f"{label} step {s} {name}: reference is rounding noise (max {np.abs(r).max():.3g}"
                                    f" < {noise:.3g}) but got max {np.abs(got).max():.3g}")
                continue
            try:
                assert_agree(got, r, tol, f"{label} step {s} grad {name}")
            except AssertionError as exc:
                problems.append(str(exc))
    if problems:
        raise AssertionError(f"{len(problems)} golden mismatches:\n" + "\n".join(problems[:20]))
