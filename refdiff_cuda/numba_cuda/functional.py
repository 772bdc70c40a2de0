"""@cuda.jit twins of refdiff.nn.functional and refdiff.nn.steps.

Each op takes the backend's array container `A` (_arrays.Arrays: where arrays live, how they
move) as its first argument, bound once by make_backend (bind_kernels); then device arrays
in, one thread per output entry (or per reduced row), the reference's formula in the reference's order of operations; constants enter as
scalars of the arrays' dtype. Elementwise ops have one version (a literal port is already
one coalesced pass); linear has versions 1 and 2 through blas.gemm.
"""
from __future__ import annotations

import math

import numpy as np
from numba import cuda

from ._arrays import grid
from .blas import gemm

def _t(dtype, v):
    return np.dtype(dtype).type(v)


# --- kernels ---------------------------------------------------------------------------------------
@cuda.jit
def _add_row_bias(y, b, N, n):                       # y (M, N) += b[j]
    i = cuda.grid(1)
    if i < n:
        y[i] += b[i % N]


@cuda.jit
def _col_sums(x, out, M, N, zero):                  # out[j] = sum_i x[i, j]
    j = cuda.grid(1)
    if j < N:
        acc = zero
        for i in range(M):
            acc += x[i * N + j]
        out[j] = acc


@cuda.jit
def _silu_fwd(x, y, s, n, half, one):
    i = cuda.grid(1)
    if i < n:
        si = half * (one + math.tanh(half * x[i]))
        s[i] = si
        y[i] = x[i] * si


@cuda.jit
def _silu_bwd(dy, x, s, dx, n, one):
    i = cuda.grid(1)
    if i < n:
        dx[i] = dy[i] * (s[i] * (one + x[i] * (one - s[i])))


@cuda.jit
def _relu_fwd(x, y, m, n, zero):
    i = cuda.grid(1)
    if i < n:
        v = x[i]
        m[i] = v > zero
        y[i] = v if (v > zero or v != v) else zero


@cuda.jit
def _relu_bwd(dy, m, dx, n):
    i = cuda.grid(1)
    if i < n:
        dx[i] = dy[i] * m[i]


@cuda.jit
def _acb_fwd(x, v, y, S, n):                         # y[bc, s] = x[bc, s] + v[bc]
    i = cuda.grid(1)
    if i < n:
        y[i] = x[i] + v[i // S]


@cuda.jit
def _row_sums(x, out, R, S, zero):                   # out[r] = sum_s x[r, s]
    r = cuda.grid(1)
    if r < R:
        acc = zero
        for s in range(S):
            acc += x[r * S + s]
        out[r] = acc


@cuda.jit
def _copy_slab(src, dst, Ci, Ct, off, S, n):         # dst[b, off + c, s] = src[b, c, s]
    i = cuda.grid(1)
    if i < n:
        b, rest = i // (Ci * S), i % (Ci * S)
        dst[b * Ct * S + off * S + rest] = src[i]


@cuda.jit
def _take_slab(src, dst, Ci, Ct, off, S, n):         # dst[b, c, s] = src[b, off + c, s]
    i = cuda.grid(1)
    if i < n:
        b, rest = i // (Ci * S), i % (Ci * S)
        dst[i] = src[b * Ct * S + off * S + rest]


@cuda.jit
def _temb(t, out, R, dim, base):
    i = cuda.grid(1)
    if i < R * dim:
        r, k = i // dim, i % dim
        a = t[r] * base ** (-(k - k % 2) / dim)
        out[i] = math.sin(a) if k % 2 == 0 else math.cos(a)


@cuda.jit
def _mse_fwd(p, q, diff, per, B, D):                # one thread per sample, float64 sum
    b = cuda.grid(1)
    if b < B:
        acc = 0.0
        for d in range(D):
            e = p[b * D + d] - q[b * D + d]
            diff[b * D + d] = e
            acc += e * e
        per[b] = acc


@cuda.jit
def _scale_rows(x, scale, out, D, n):
    i = cuda.grid(1)
    if i < n:
        out[i] = x[i] * scale[i // D]


@cuda.jit
def _adam(p, g, m, v, n, b1, omb1, b2, omb2, decay, lr_bc1, sqrt_bc2, eps):
    i = cuda.grid(1)
    if i < n:           # NumPy's order and precision (see numba_cpu/functional.py _adam_body)
        pi = p[i] * decay
        mi = m[i] * b1 + omb1 * g[i]
        vi = v[i] * b2 + (omb2 * g[i]) * g[i]
        m[i] = mi
        v[i] = vi
        den = float(math.sqrt(vi)) / sqrt_bc2 + eps
        p[i] = float(pi) - float(lr_bc1 * mi) / den


@cuda.jit
def _ddpm(x, e, z, out, n, ce, cx, cz):
    i = cuda.grid(1)
    if i < n:
        out[i] = (x[i] - ce * e[i]) * cx + cz * z[i]


@cuda.jit
def _em(x, s, z, out, n, adt, g2dt, cz):
    i = cuda.grid(1)
    if i < n:
        out[i] = x[i] + adt * x[i] + g2dt * s[i] + cz * z[i]


def launch(kernel, n, *args):
    if n:
        kernel[grid(n)](*args)


def flat(d):
    return d.reshape(d.size)


# --- linear -------------------------------------------------------------------------------------------
def _linear(version):
    def forward(A, x, w, b):
        dt = np.dtype(x.dtype)
        xd, wd = A.dev(x), A.dev(w, dt)
        (B, Din), Dout = xd.shape, wd.shape[0]
        y = gemm(A, xd, False, wd, True, B, Dout, Din, dt, version)            # x w^T
        if b is not None:
            launch(_add_row_bias, B * Dout, flat(y), A.dev(b, dt), Dout, B * Dout)
        return A.out(y), (xd, wd, b is not None)

    def backward(A, dy, cache):
        xd, wd, has_b = cache
        dt = np.dtype(xd.dtype)
        dyd = A.dev(dy, dt)
        (B, Din), Dout = xd.shape, wd.shape[0]
        dx = gemm(A, dyd, False, wd, False, B, Din, Dout, dt, version)         # dy w
        dw = gemm(A, dyd, True, xd, False, Dout, Din, B, dt, version)          # dy^T x
        db = None
        if has_b:
            db = A.empty((Dout,), dt)
            launch(_col_sums, Dout, flat(dyd), db, B, Dout, _t(dt, 0))
        return A.out(dx), A.out(dw), (None if db is None else A.out(db))
    return forward, backward


# --- activations ------------------------------------------------------------------------------------
def silu_forward(A, x):
    xd = A.dev(x)
    dt = np.dtype(xd.dtype)
    y, s = A.empty(xd.shape, dt), A.empty(xd.shape, dt)
    launch(_silu_fwd, xd.size, flat(xd), flat(y), flat(s), xd.size, _t(dt, 0.5), _t(dt, 1))
    return A.out(y), (xd, s)


def silu_backward(A, dy, cache):
    xd, s = cache
    dyd = A.dev(dy, xd.dtype)
    dx = A.empty(xd.shape, xd.dtype)
    launch(_silu_bwd, xd.size, flat(dyd), flat(xd), flat(s), flat(dx), xd.size, _t(xd.dtype, 1))
    return A.out(dx)


def relu_forward(A, x):
    xd = A.dev(x)
    y, m = A.empty(xd.shape, xd.dtype), A.empty(xd.shape, np.bool_)
    launch(_relu_fwd, xd.size, flat(xd), flat(y), flat(m), xd.size, _t(xd.dtype, 0))
    return A.out(y), A.out(m)


def relu_backward(A, dy, cache):
    md = A.dev(cache)
    dyd = A.dev(dy)
    dx = A.empty(dyd.shape, dyd.dtype)
    launch(_relu_bwd, dyd.size, flat(dyd), flat(md), flat(dx), dyd.size)
    return A.out(dx)


# --- shape ops ------------------------------------------------------------------------------------
def concat_forward(A, xs, axis=1):
    """Along axis 1 (channels) on the device; other axes through the host reference."""
    if axis != 1:
        from refdiff.nn import functional as F
        y, cache = F.concat_forward([A.to_numpy(x) for x in xs], axis)
        return A.asarray(y), cache
    dt = np.result_type(*[x.dtype for x in xs])
    ds = [A.dev(x, dt) for x in xs]
    B, S = ds[0].shape[0], int(np.prod(ds[0].shape[2:], dtype=np.int64))
    Ct = sum(d.shape[1] for d in ds)
    y = A.empty((B, Ct) + tuple(ds[0].shape[2:]), dt)
    off = 0
    for d in ds:
        launch(_copy_slab, d.size, flat(d), flat(y), d.shape[1], Ct, off, S, d.size)
        off += d.shape[1]
    return A.out(y), ([d.shape[1] for d in ds], axis)


def concat_backward(A, dy, cache):
    sizes, axis = cache
    if axis != 1:
        from refdiff.nn import functional as F
        return [A.asarray(g) for g in F.concat_backward(A.to_numpy(dy), cache)]
    dyd = A.dev(dy)
    B, Ct = dyd.shape[:2]
    S = int(np.prod(dyd.shape[2:], dtype=np.int64))
    out, off = [], 0
    for Ci in sizes:
        g = A.empty((B, Ci) + tuple(dyd.shape[2:]), dyd.dtype)
        launch(_take_slab, g.size, flat(dyd), flat(g), Ci, Ct, off, S, g.size)
        out.append(A.out(g))
        off += Ci
    return out


def add_channel_bias_forward(A, x, v):
    xd = A.dev(x)
    vd = A.dev(v, xd.dtype)
    S = int(np.prod(xd.shape[2:], dtype=np.int64))
    y = A.empty(xd.shape, xd.dtype)
    launch(_acb_fwd, xd.size, flat(xd), flat(vd), flat(y), S, xd.size)
    return A.out(y), xd.ndim


def add_channel_bias_backward(A, dy, cache):
    if cache == 2:
        return dy, dy
    dyd = A.dev(dy)
    B, C = dyd.shape[:2]
    S = int(np.prod(dyd.shape[2:], dtype=np.int64))
    dv = A.empty((B, C), dyd.dtype)
    launch(_row_sums, B * C, flat(dyd), flat(dv), B * C, S, _t(dyd.dtype, 0))
    return dy, A.out(dv)


# --- time embedding, loss, optimiser, sampler steps ------------------------------------------------------
def time_embedding(A, t, dim, base=10000.0, dtype=np.float32):
    """In float64 on the device (one thread per entry), then cast like the reference."""
    th = np.asarray(A.to_numpy(t), dtype=np.float64).reshape(-1)
    out = A.empty((th.size, int(dim)), np.float64)
    launch(_temb, th.size * int(dim), A.dev(th), flat(out), th.size, int(dim), float(base))
    return A.asarray(A.out(out).astype(dtype))


def mse_forward(A, pred, target, weight=None):
    pd = A.dev(pred)
    td = A.dev(target, pd.dtype)
    B = pd.shape[0]
    D = pd.size // B
    diff, per = A.empty(pd.shape, pd.dtype), A.empty((B,), np.float64)
    launch(_mse_fwd, B, flat(pd), flat(td), flat(diff), per, B, D)
    w = np.ones(B) if weight is None else np.asarray(A.to_numpy(weight), dtype=np.float64)
    return float(np.mean(w * A.to_numpy(per))), (diff, w.astype(pd.dtype))


def mse_backward(A, cache):
    diff, w = cache
    B = diff.shape[0]
    scale = A.dev(((2.0 / B) * w).astype(diff.dtype))
    out = A.empty(diff.shape, diff.dtype)
    launch(_scale_rows, diff.size, flat(diff), scale, flat(out), diff.size // B, diff.size)
    return A.out(out)


def adam_update(A, p, g, m, v, lr, beta1, beta2, eps, step, weight_decay=0.0):
    """In place. Host arrays: p, m, v are uploaded, updated and copied back into place."""
    dt = np.dtype(p.dtype)
    t = dt.type
    ds = [A.dev(a, dt) for a in (p, g, m, v)]
    bc1, bc2 = 1 - beta1 ** step, 1 - beta2 ** step
    decay = t(1 - lr * weight_decay) if weight_decay else t(1)
    launch(_adam, ds[0].size, *[flat(d) for d in ds], ds[0].size, t(beta1), t(1 - beta1), t(beta2), t(1 - beta2),
           decay, t(lr / bc1), float(np.sqrt(bc2)), float(eps))
    if A.mode == "host":
        for host, d in ((p, ds[0]), (m, ds[2]), (v, ds[3])):
            host[...] = d.copy_to_host().reshape(host.shape)


def _step(A, kernel, x, a, z, c1, c2, c3):
    xd = A.dev(x)
    ad = A.dev(a, xd.dtype)
    if z is None:
        zd, c3 = A.zeros(xd.shape, xd.dtype), _t(xd.dtype, 0)
    else:
        zd = A.dev(z, xd.dtype)
    out = A.empty(xd.shape, xd.dtype)
    launch(kernel, xd.size, flat(xd), flat(ad), flat(zd), flat(out), xd.size, c1, c2, c3)
    return A.out(out)


def ddpm_step(A, x, eps, z, beta, alpha_bar, sigma):
    from refdiff.nn.steps import ddpm_coeffs
    coef, inv = ddpm_coeffs(beta, alpha_bar, x.dtype)
    return _step(A, _ddpm, x, eps, z, coef, inv, _t(x.dtype, sigma))


def em_step(A, x, score, z, a, g, dt):
    from refdiff.nn.steps import em_coeffs
    adt, g2dt, noise = em_coeffs(a, g, dt, x.dtype)
    return _step(A, _em, x, score, z, adt, g2dt, noise)


KERNELS = {
    "linear": {1: _linear(1), 2: _linear(2)},
    "silu": {1: (silu_forward, silu_backward)},
    "relu": {1: (relu_forward, relu_backward)},
    "concat": {1: (concat_forward, concat_backward)},
    "add_channel_bias": {1: (add_channel_bias_forward, add_channel_bias_backward)},
    "time_embedding": {1: (time_embedding,)},
    "mse": {1: (mse_forward, mse_backward)},
    "adam_update": {1: (adam_update,)},
    "ddpm_step": {1: (ddpm_step,)},
    "em_step": {1: (em_step,)},
}
