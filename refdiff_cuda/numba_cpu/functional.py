"""Numba (CPU) twins of refdiff.nn.functional and refdiff.nn.steps.

Version 1 of each op is a literal, serial `@njit` port of the reference: the same formula,
the same order of operations, C-contiguous NCHW arrays. Version 2 runs `parallel=True`
loops over the memory order of whatever layout arrives (see _layout.py), fuses what the
reference does in several NumPy passes into one, and writes no temporaries. fastmath is off
everywhere: results differ from the reference only by summation order (and, for tanh, by
the libm vs NumPy-SIMD implementation, within 1-2 ulp).

Constants enter the kernels as scalars of the array's dtype (cast in Python), never as
float64 literals, so that float32 kernels stay float32 like the reference.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit, prange


from ._blas import matmul
from ._layout import cm, flat_pair, nchw

_JIT = dict(cache=True, fastmath=False)


def _t(x, v):
    return x.dtype.type(v)


# --- linear -----------------------------------------------------------------------------------
@njit(**_JIT)
def _linear_fwd_v1(x, w, b, has_b):
    y = np.dot(x, np.ascontiguousarray(w.T))
    if has_b:
        for i in range(y.shape[0]):
            for o in range(y.shape[1]):
                y[i, o] = y[i, o] + b[o]
    return y


@njit(**_JIT)
def _linear_bwd_v1(dy, x, w, has_b):
    dx = np.dot(dy, w)
    dw = np.dot(np.ascontiguousarray(dy.T), x)
    db = np.zeros(dy.shape[1], dy.dtype)
    if has_b:
        for i in range(dy.shape[0]):
            for o in range(dy.shape[1]):
                db[o] += dy[i, o]
    return dx, dw, db


def linear_forward_v1(x, w, b):
    x = np.ascontiguousarray(x)
    w = np.ascontiguousarray(w, dtype=x.dtype)
    bb = np.zeros(w.shape[0], x.dtype) if b is None else np.ascontiguousarray(b, dtype=x.dtype)
    return _linear_fwd_v1(x, w, bb, b is not None), (x, w, b is not None)


def linear_backward_v1(dy, cache):
    x, w, has_b = cache
    dx, dw, db = _linear_bwd_v1(np.ascontiguousarray(dy, dtype=x.dtype), x, w, has_b)
    return dx, dw, (db if has_b else None)


def linear_forward_v2(x, w, b):
    """Single-threaded BLAS on numba's threads (_blas.matmul), bias added in place."""
    x = np.asarray(x)
    y = matmul(x, np.asarray(w, dtype=x.dtype).T)
    if b is not None:
        y += np.asarray(b, dtype=x.dtype)
    return y, (x, np.asarray(w, dtype=x.dtype), b is not None)


def linear_backward_v2(dy, cache):
    x, w, has_b = cache
    dy = np.asarray(dy, dtype=x.dtype)
    return matmul(dy, w), matmul(dy.T, x), (dy.sum(axis=0) if has_b else None)


# --- SiLU ---------------------------------------------------------------------------------------
@njit(**_JIT)
def _silu_fwd_v1(x, half, one):
    s = np.empty_like(x)
    y = np.empty_like(x)
    for i in range(x.size):
        s[i] = half * (one + math.tanh(half * x[i]))     # sigmoid(x) = (1 + tanh(x/2)) / 2
        y[i] = x[i] * s[i]
    return y, s


@njit(**_JIT)
def _silu_bwd_v1(dy, x, s, one):
    dx = np.empty_like(x)
    for i in range(x.size):
        dx[i] = dy[i] * (s[i] * (one + x[i] * (one - s[i])))
    return dx


def silu_forward_v1(x):
    x = np.ascontiguousarray(x)
    y, s = _silu_fwd_v1(x.reshape(-1), _t(x, 0.5), _t(x, 1))
    return y.reshape(x.shape), (x, s.reshape(x.shape))


def silu_backward_v1(dy, cache):
    x, s = cache
    dy = np.ascontiguousarray(dy, dtype=x.dtype)
    return _silu_bwd_v1(dy.reshape(-1), x.reshape(-1), s.reshape(-1), _t(x, 1)).reshape(x.shape)


@njit(parallel=True, **_JIT)
def _silu_fwd_v2(x, s, y, half, one):
    for i in prange(x.size):          # s holds tanh(x/2) on entry
        si = half * (one + s[i])
        s[i] = si
        y[i] = x[i] * si


@njit(parallel=True, **_JIT)
def _silu_bwd_v2(dy, x, s, dx, one):
    for i in prange(x.size):
        si = s[i]
        dx[i] = dy[i] * (si * (one + x[i] * (one - si)))


def silu_forward_v2(x):
    """tanh by NumPy's SIMD loop (in place, no temporary), the rest in one parallel pass:
    the same arithmetic as the reference, so y and s equal it bit for bit."""
    xf, _, back = flat_pair(x)
    s = np.multiply(xf, _t(xf, 0.5))
    np.tanh(s, out=s)
    y = np.empty_like(xf)
    _silu_fwd_v2(xf, s, y, _t(xf, 0.5), _t(xf, 1))
    return back(y), (xf, s, back)


def silu_backward_v2(dy, cache):
    xf, s, back = cache
    dyf = _flat_like(dy, back(xf), xf.dtype)
    dx = np.empty_like(xf)
    _silu_bwd_v2(dyf, xf, s, dx, _t(xf, 1))
    return back(dx)


def _flat_like(a, ref, dtype):
    """a (shaped like ref) as a 1-D array in ref's memory order."""
    _, (af,), _ = flat_pair(ref, np.asarray(a, dtype=dtype))
    return af


# --- ReLU ---------------------------------------------------------------------------------------
@njit(**_JIT)
def _relu_fwd_v1(x, zero):
    y = np.empty_like(x)
    m = np.empty(x.size, np.bool_)
    for i in range(x.size):
        v = x[i]
        m[i] = v > zero
        y[i] = v if (v > zero or v != v) else zero   # np.maximum(x, 0) propagates NaN
    return y, m


@njit(**_JIT)
def _relu_bwd_v1(dy, m, zero):
    dx = np.empty_like(dy)
    for i in range(dy.size):
        dx[i] = dy[i] * m[i]
    return dx


@njit(parallel=True, **_JIT)
def _relu_fwd_v2(x, y, m, zero):
    for i in prange(x.size):
        v = x[i]
        m[i] = v > zero
        y[i] = v if (v > zero or v != v) else zero   # np.maximum propagates NaN


@njit(parallel=True, **_JIT)
def _relu_bwd_v2(dy, m, dx, zero):
    for i in prange(dy.size):
        dx[i] = dy[i] * m[i]


def relu_forward_v1(x):
    x = np.ascontiguousarray(x)
    y, m = _relu_fwd_v1(x.reshape(-1), _t(x, 0))
    return y.reshape(x.shape), m.reshape(x.shape)


def relu_backward_v1(dy, cache):
    m = cache
    dy = np.ascontiguousarray(dy)
    return _relu_bwd_v1(dy.reshape(-1), m.reshape(-1), _t(dy, 0)).reshape(m.shape)


def relu_forward_v2(x):
    xf, _, back = flat_pair(x)
    y, m = np.empty_like(xf), np.empty(xf.size, np.bool_)
    _relu_fwd_v2(xf, y, m, _t(xf, 0))
    return back(y), back(m)


def relu_backward_v2(dy, cache):
    mf, _, back = flat_pair(cache)
    dyf = _flat_like(dy, cache, np.asarray(dy).dtype)
    dx = np.empty_like(dyf)
    _relu_bwd_v2(dyf, mf, dx, _t(dyf, 0))
    return back(dx)


# --- concat (channel axis in the UNet) -----------------------------------------------------------
def concat_forward_v1(xs, axis=1):
    """Copy each input into its slab of a fresh output (the reference's np.concatenate)."""
    xs = [np.asarray(x) for x in xs]
    shape = list(xs[0].shape)
    shape[axis] = sum(x.shape[axis] for x in xs)
    out = np.empty(shape, dtype=np.result_type(*xs))
    o = 0
    for x in xs:
        idx = [slice(None)] * out.ndim
        idx[axis] = slice(o, o + x.shape[axis])
        out[tuple(idx)] = x
        o += x.shape[axis]
    return out, ([x.shape[axis] for x in xs], axis)


def concat_backward_v1(dy, cache):
    sizes, axis = cache
    return np.split(np.asarray(dy), np.cumsum(sizes)[:-1], axis=axis)


def concat_forward_v2(xs, axis=1):
    """axis 1 of channel-major buffers is their outermost axis: one block copy per input."""
    if axis != 1 or xs[0].ndim < 3:
        return concat_forward_v1(xs, axis)
    dtype = np.result_type(*xs)
    buf = np.concatenate([cm(x, dtype) for x in xs], axis=0)
    return nchw(buf), ([x.shape[1] for x in xs], axis)


concat_backward_v2 = concat_backward_v1      # views of dy, no copy (as the reference)


# --- add_channel_bias ----------------------------------------------------------------------------
@njit(**_JIT)
def _acb_fwd_v1(x, v):
    B, C, S = x.shape
    y = np.empty_like(x)
    for b in range(B):
        for c in range(C):
            for s in range(S):
                y[b, c, s] = x[b, c, s] + v[b, c]
    return y


@njit(**_JIT)
def _acb_bwd_v1(dy):
    B, C, S = dy.shape
    dv = np.zeros((B, C), dy.dtype)
    for b in range(B):
        for c in range(C):
            for s in range(S):
                dv[b, c] += dy[b, c, s]
    return dv


def add_channel_bias_forward_v1(x, v):
    x = np.ascontiguousarray(x)
    B, C = x.shape[:2]
    y = _acb_fwd_v1(x.reshape(B, C, -1), np.ascontiguousarray(v, dtype=x.dtype).reshape(B, C))
    return y.reshape(x.shape), x.ndim


def add_channel_bias_backward_v1(dy, cache):
    ndim = cache
    if ndim == 2:
        return dy, dy
    dy = np.ascontiguousarray(dy)
    return dy, _acb_bwd_v1(dy.reshape(dy.shape[0], dy.shape[1], -1))


@njit(parallel=True, **_JIT)
def _acb_fwd_v2(x, v, y):            # channel-major x, y (C, B, S); v (B, C)
    C, B, S = x.shape
    for cb in prange(C * B):
        c, b = cb // B, cb % B
        vv = v[b, c]
        for s in range(S):
            y[c, b, s] = x[c, b, s] + vv


@njit(parallel=True, **_JIT)
def _acb_bwd_v2(dy, dv):             # dy (C, B, S) -> dv (B, C), float64 partial sums
    C, B, S = dy.shape
    for cb in prange(C * B):
        c, b = cb // B, cb % B
        acc = 0.0
        for s in range(S):
            acc += dy[c, b, s]
        dv[b, c] = acc


def add_channel_bias_forward_v2(x, v):
    x = np.asarray(x)
    if x.ndim == 2:
        return x + np.asarray(v, dtype=x.dtype), 2
    xc = cm(x)
    C, B = xc.shape[:2]
    y = np.empty_like(xc)
    _acb_fwd_v2(xc.reshape(C, B, -1), np.ascontiguousarray(v, dtype=x.dtype).reshape(B, C), y.reshape(C, B, -1))
    return nchw(y), x.ndim


def add_channel_bias_backward_v2(dy, cache):
    if cache == 2:
        return dy, dy
    dyc = cm(dy)
    C, B = dyc.shape[:2]
    dv = np.empty((B, C), np.float64)
    _acb_bwd_v2(dyc.reshape(C, B, -1), dv)
    return dy, dv.astype(dyc.dtype)


# --- time embedding ------------------------------------------------------------------------------
@njit(**_JIT)
def _temb(tu, dim, base):
    out = np.empty((tu.size, dim), np.float64)
    for k in range(dim):
        freq = base ** (-(k - k % 2) / dim)             # 1 / base^(2i/d) for columns 2i, 2i+1
        for r in range(tu.size):
            a = tu[r] * freq
            out[r, k] = math.sin(a) if k % 2 == 0 else math.cos(a)
    return out


def time_embedding_v1(t, dim, base=10000.0, dtype=np.float32):
    """Embed each distinct t once (as the reference), in float64, then cast."""
    t = np.asarray(t, dtype=np.float64).reshape(-1)
    tu, inv = np.unique(t, return_inverse=True)
    return _temb(tu, int(dim), float(base)).astype(dtype)[inv.reshape(-1)]


# --- MSE -----------------------------------------------------------------------------------------
@njit(parallel=True, **_JIT)
def _mse_fwd(pred, target, diff, per):
    B, D = pred.shape
    for b in prange(B):
        acc = 0.0                                       # float64 accumulator
        for d in range(D):
            e = pred[b, d] - target[b, d]
            diff[b, d] = e
            acc += e * e
        per[b] = acc


@njit(parallel=True, **_JIT)
def _mse_bwd(diff, scale, out):
    B, D = diff.shape
    for b in prange(B):
        s = scale[b]
        for d in range(D):
            out[b, d] = diff[b, d] * s


def mse_forward_v1(pred, target, weight=None):
    """One pass: diff and per-sample sums (float64 accumulation; the reference sums in dtype)."""
    pred = np.ascontiguousarray(pred)
    B = pred.shape[0]
    p2 = pred.reshape(B, -1)
    t2 = np.ascontiguousarray(target, dtype=pred.dtype).reshape(B, -1)
    diff, per = np.empty_like(p2), np.empty(B, np.float64)
    _mse_fwd(p2, t2, diff, per)
    w = np.ones(B) if weight is None else np.asarray(weight, dtype=np.float64)
    return float(np.mean(w * per)), (diff.reshape(pred.shape), w.astype(pred.dtype))


def mse_backward_v1(cache):
    diff, w = cache
    B = diff.shape[0]
    scale = ((2.0 / B) * w).astype(diff.dtype)
    out = np.empty_like(diff)
    _mse_bwd(diff.reshape(B, -1), scale, out.reshape(B, -1))
    return out


# --- Adam ----------------------------------------------------------------------------------------
@njit(**_JIT)
def _adam_body(i, p, g, m, v, b1, omb1, b2, omb2, decay, lr_bc1, sqrt_bc2, eps):
    # Bit-for-bit NumPy's order (NEP 50): m, v and lr/bc1 * m in dtype; the denominator and
    # the quotient in float64 (np.sqrt(bc2) is a float64 scalar), p rounded once at the end.
    pi = p[i] * decay
    mi = m[i] * b1 + omb1 * g[i]
    vi = v[i] * b2 + (omb2 * g[i]) * g[i]
    m[i], v[i] = mi, vi
    den = np.float64(math.sqrt(vi)) / sqrt_bc2 + eps
    p[i] = np.float64(pi) - np.float64(lr_bc1 * mi) / den


@njit(**_JIT)
def _adam_v1(p, g, m, v, b1, omb1, b2, omb2, decay, lr_bc1, sqrt_bc2, eps):
    for i in range(p.size):
        _adam_body(i, p, g, m, v, b1, omb1, b2, omb2, decay, lr_bc1, sqrt_bc2, eps)


@njit(parallel=True, **_JIT)
def _adam_v2(p, g, m, v, b1, omb1, b2, omb2, decay, lr_bc1, sqrt_bc2, eps):
    for i in prange(p.size):
        _adam_body(i, p, g, m, v, b1, omb1, b2, omb2, decay, lr_bc1, sqrt_bc2, eps)


def _adam(kernel, p, g, m, v, lr, beta1, beta2, eps, step, weight_decay):
    t = p.dtype.type
    for a in (p, m, v):
        if not a.flags.c_contiguous:
            raise ValueError("adam_update updates p, m, v in place: they must be C-contiguous")
    gf = np.ascontiguousarray(g, dtype=p.dtype).reshape(-1)
    bc1, bc2 = 1 - beta1 ** step, 1 - beta2 ** step
    decay = t(1 - lr * weight_decay) if weight_decay else t(1)
    kernel(p.reshape(-1), gf, m.reshape(-1), v.reshape(-1), t(beta1), t(1 - beta1), t(beta2), t(1 - beta2),
           decay, t(lr / bc1), float(np.sqrt(bc2)), float(eps))


def adam_update_v1(p, g, m, v, lr, beta1, beta2, eps, step, weight_decay=0.0):
    _adam(_adam_v1, p, g, m, v, lr, beta1, beta2, eps, step, weight_decay)


def adam_update_v2(p, g, m, v, lr, beta1, beta2, eps, step, weight_decay=0.0):
    _adam(_adam_v2, p, g, m, v, lr, beta1, beta2, eps, step, weight_decay)


# --- sampler steps -------------------------------------------------------------------------------
@njit(**_JIT)
def _axpby_v1(x, e, z, ce, cx, cz, out):
    for i in range(x.size):
        out[i] = (x[i] - ce * e[i]) * cx + cz * z[i]


@njit(parallel=True, **_JIT)
def _axpby_v2(x, e, z, ce, cx, cz, out):
    for i in prange(x.size):
        out[i] = (x[i] - ce * e[i]) * cx + cz * z[i]


@njit(**_JIT)
def _em_v1(x, s, z, adt, g2dt, cz, out):
    for i in range(x.size):
        out[i] = x[i] + adt * x[i] + g2dt * s[i] + cz * z[i]


@njit(parallel=True, **_JIT)
def _em_v2(x, s, z, adt, g2dt, cz, out):
    for i in prange(x.size):
        out[i] = x[i] + adt * x[i] + g2dt * s[i] + cz * z[i]


def _step(kernel, x, a, z, c1, c2, c3):
    if z is None:                       # last step: no noise (adding 0 * 0 changes nothing)
        xf, (af,), back = flat_pair(x, np.asarray(a, dtype=np.asarray(x).dtype))
        zf, c3 = np.zeros_like(xf), xf.dtype.type(0)
    else:
        dt = np.asarray(x).dtype
        xf, (af, zf), back = flat_pair(x, np.asarray(a, dtype=dt), np.asarray(z, dtype=dt))
    out = np.empty_like(xf)
    kernel(xf, af, zf, c1, c2, c3, out)
    return back(out)


def _ddpm_step(kernel, x, eps, z, beta, alpha_bar, sigma):
    from refdiff.nn.steps import ddpm_coeffs

    coef, inv = ddpm_coeffs(beta, alpha_bar, np.asarray(x).dtype)
    return _step(kernel, x, eps, z, coef, inv, np.asarray(x).dtype.type(sigma))


def _em_step(kernel, x, score, z, a, g, dt):
    from refdiff.nn.steps import em_coeffs

    adt, g2dt, noise = em_coeffs(a, g, dt, np.asarray(x).dtype)
    return _step(kernel, x, score, z, adt, g2dt, noise)


# Plain functions (not closures made at import) so that the kernels' mutation run can switch them.
def ddpm_step_v1(x, eps, z, beta, alpha_bar, sigma):
    """Fused ddpm_step (refdiff.nn.steps.ddpm_step): one pass over x, eps, z."""
    return _ddpm_step(_axpby_v1, x, eps, z, beta, alpha_bar, sigma)


def ddpm_step_v2(x, eps, z, beta, alpha_bar, sigma):
    """Fused ddpm_step (refdiff.nn.steps.ddpm_step): one parallel pass over x, eps, z."""
    return _ddpm_step(_axpby_v2, x, eps, z, beta, alpha_bar, sigma)


def em_step_v1(x, score, z, a, g, dt):
    """Fused em_step (refdiff.nn.steps.em_step): one pass over x, score, z."""
    return _em_step(_em_v1, x, score, z, a, g, dt)


def em_step_v2(x, score, z, a, g, dt):
    """Fused em_step (refdiff.nn.steps.em_step): one parallel pass over x, score, z."""
    return _em_step(_em_v2, x, score, z, a, g, dt)


KERNELS = {
    "linear": {1: (linear_forward_v1, linear_backward_v1), 2: (linear_forward_v2, linear_backward_v2)},
    "silu": {1: (silu_forward_v1, silu_backward_v1), 2: (silu_forward_v2, silu_backward_v2)},
    "relu": {1: (relu_forward_v1, relu_backward_v1), 2: (relu_forward_v2, relu_backward_v2)},
    "concat": {1: (concat_forward_v1, concat_backward_v1), 2: (concat_forward_v2, concat_backward_v2)},
    "add_channel_bias": {1: (add_channel_bias_forward_v1, add_channel_bias_backward_v1),
                         2: (add_channel_bias_forward_v2, add_channel_bias_backward_v2)},
    "time_embedding": {1: (time_embedding_v1,)},
    "mse": {1: (mse_forward_v1, mse_backward_v1)},
    "adam_update": {1: (adam_update_v1,), 2: (adam_update_v2,)},
    "ddpm_step": {1: (ddpm_step_v1,), 2: (ddpm_step_v2,)},
    "em_step": {1: (em_step_v1,), 2: (em_step_v2,)},
}
