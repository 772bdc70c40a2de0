"""@cuda.jit twins of refdiff/nn/norm.py: group_norm and group_norm_silu (fused).

Per (sample, group) statistics, then one thread per entry for y (and for dx); SiLU is fused
(z = xhat gamma + beta and sigmoid(z) are recomputed, never stored). Sums accumulate in
float64 and are rounded to the dtype where the reference holds a dtype value.
  version 1  one thread per (sample, group) walks the group serially for the sums (the
             reference's loops, literally);
  version 2  one block of 128 threads per (sample, group): strided partial sums, then a
             shared-memory tree reduction (log2 128 = 7 halvings).
dgamma, dbeta: one thread per channel over samples and positions (deterministic).
"""
from __future__ import annotations

import math

import numpy as np
from numba import config, cuda, float64

from refdiff.nn.norm import _check

from .functional import _t, flat, launch

RB = 8 if config.ENABLE_CUDASIM else 128     # threads per block of version 2's reductions (a power of 2)


@cuda.jit(device=True)
def _dz(d, xh, ga, be, half, one, with_silu):
    if with_silu:
        z = xh * ga + be
        sz = half * (one + math.tanh(half * z))
        return d * (sz * (one + z * (one - sz)))
    return d


@cuda.jit
def _stats_v1(x, mean, rstd, BG, n, eps, one):
    t = cuda.grid(1)
    if t < BG:
        acc = 0.0
        for k in range(n):
            acc += x[t * n + k]
        mean[t] = acc / n                                  # rounded to the dtype here
        mu = mean[t]
        acc = 0.0
        for k in range(n):
            d = x[t * n + k] - mu
            acc += d * d
        rstd[t] = acc / n
        rstd[t] = one / math.sqrt(rstd[t] + eps)


@cuda.jit
def _stats_v2(x, mean, rstd, n, eps, one):
    t, tid = cuda.blockIdx.x, cuda.threadIdx.x
    sh = cuda.shared.array(RB, float64)
    acc = 0.0
    for k in range(tid, n, RB):
        acc += x[t * n + k]
    sh[tid] = acc
    cuda.syncthreads()
    h = RB // 2
    while h > 0:
        if tid < h:
            sh[tid] += sh[tid + h]
        cuda.syncthreads()
        h //= 2
    if tid == 0:
        mean[t] = sh[0] / n
    cuda.syncthreads()
    mu = mean[t]
    acc = 0.0
    for k in range(tid, n, RB):
        d = x[t * n + k] - mu
        acc += d * d
    cuda.syncthreads()
    sh[tid] = acc
    cuda.syncthreads()
    h = RB // 2
    while h > 0:
        if tid < h:
            sh[tid] += sh[tid + h]
        cuda.syncthreads()
        h //= 2
    if tid == 0:
        rstd[t] = sh[0] / n
        rstd[t] = one / math.sqrt(rstd[t] + eps)


@cuda.jit
def _apply(x, mean, rstd, gamma, beta, y, N, C, S, Cg, half, one, with_silu):
    i = cuda.grid(1)
    if i < N:
        c = (i // S) % C
        t = (i // (C * S)) * (C // Cg) + c // Cg
        z = ((x[i] - mean[t]) * rstd[t]) * gamma[c] + beta[c]
        if with_silu:
            z = z * (half * (one + math.tanh(half * z)))
        y[i] = z


@cuda.jit
def _bwd_sums_v1(dy, x, mean, rstd, gamma, beta, mg, mgx, BG, n, C, S, Cg, half, one, with_silu):
    t = cuda.grid(1)
    if t < BG:
        g0 = (t % (C // Cg)) * Cg
        sg, sgx = 0.0, 0.0
        for k in range(n):
            c = g0 + k // S
            xh = (x[t * n + k] - mean[t]) * rstd[t]
            d = _dz(dy[t * n + k], xh, gamma[c], beta[c], half, one, with_silu)
            gg = d * gamma[c]
            sg += gg
            sgx += gg * xh
        mg[t] = sg / n
        mgx[t] = sgx / n


@cuda.jit
def _bwd_sums_v2(dy, x, mean, rstd, gamma, beta, mg, mgx, n, C, S, Cg, half, one, with_silu):
    t, tid = cuda.blockIdx.x, cuda.threadIdx.x
    sh = cuda.shared.array((2, RB), float64)
    g0 = (t % (C // Cg)) * Cg
    sg, sgx = 0.0, 0.0
    for k in range(tid, n, RB):
        c = g0 + k // S
        xh = (x[t * n + k] - mean[t]) * rstd[t]
        d = _dz(dy[t * n + k], xh, gamma[c], beta[c], half, one, with_silu)
        gg = d * gamma[c]
        sg += gg
        sgx += gg * xh
    sh[0, tid] = sg
    sh[1, tid] = sgx
    cuda.syncthreads()
    h = RB // 2
    while h > 0:
        if tid < h:
            sh[0, tid] += sh[0, tid + h]
            sh[1, tid] += sh[1, tid + h]
        cuda.syncthreads()
        h //= 2
    if tid == 0:
        mg[t] = sh[0, 0] / n
        mgx[t] = sh[1, 0] / n


@cuda.jit
def _bwd_apply(dy, x, mean, rstd, gamma, beta, mg, mgx, dx, N, C, S, Cg, half, one, with_silu):
    i = cuda.grid(1)
    if i < N:
        c = (i // S) % C
        t = (i // (C * S)) * (C // Cg) + c // Cg
        xh = (x[i] - mean[t]) * rstd[t]
        d = _dz(dy[i], xh, gamma[c], beta[c], half, one, with_silu)
        dx[i] = rstd[t] * (d * gamma[c] - mg[t] - xh * mgx[t])


@cuda.jit
def _param_grads(dy, x, mean, rstd, gamma, beta, dgam, dbet, B, C, S, Cg, half, one, with_silu):
    c = cuda.grid(1)
    if c < C:
        pg, pb = 0.0, 0.0
        for b in range(B):
            t = b * (C // Cg) + c // Cg
            for s in range(S):
                i = (b * C + c) * S + s
                xh = (x[i] - mean[t]) * rstd[t]
                d = _dz(dy[i], xh, gamma[c], beta[c], half, one, with_silu)
                pg += d * xh
                pb += d
        dgam[c] = pg
        dbet[c] = pb


def _pair(version, with_silu):
    def forward(A, x, num_groups, gamma, beta, eps=1e-5):
        _check(x, num_groups, gamma, beta)
        xd = A.dev(x)
        dt = np.dtype(xd.dtype)
        B, C = xd.shape[:2]
        S, G = xd.size // (B * C), num_groups
        n = (C // G) * S
        gd, bd = A.dev(gamma, dt), A.dev(beta, dt)
        mean, rstd = A.empty((B * G,), dt), A.empty((B * G,), dt)
        if version == 1:
            launch(_stats_v1, B * G, flat(xd), mean, rstd, B * G, n, _t(dt, eps), _t(dt, 1))
        else:
            _stats_v2[(B * G,), (RB,)](flat(xd), mean, rstd, n, _t(dt, eps), _t(dt, 1))
        y = A.empty(xd.shape, dt)
        launch(_apply, xd.size, flat(xd), mean, rstd, gd, bd, flat(y), xd.size, C, S, C // G,
               _t(dt, 0.5), _t(dt, 1), with_silu)
        return A.out(y), (xd, G, gd, bd, mean, rstd)

    def backward(A, dy, cache):
        xd, G, gd, bd, mean, rstd = cache
        dt = np.dtype(xd.dtype)
        B, C = xd.shape[:2]
        S = xd.size // (B * C)
        n, Cg = (C // G) * S, C // G
        dyd = A.dev(dy, dt)
        half, one = _t(dt, 0.5), _t(dt, 1)
        mg, mgx = A.empty((B * G,), dt), A.empty((B * G,), dt)
        if version == 1:
            launch(_bwd_sums_v1, B * G, flat(dyd), flat(xd), mean, rstd, gd, bd, mg, mgx, B * G, n, C, S, Cg,
                   half, one, with_silu)
        else:
            _bwd_sums_v2[(B * G,), (RB,)](flat(dyd), flat(xd), mean, rstd, gd, bd, mg, mgx, n, C, S, Cg,
                                          half, one, with_silu)
        dx = A.empty(xd.shape, dt)
        launch(_bwd_apply, xd.size, flat(dyd), flat(xd), mean, rstd, gd, bd, mg, mgx, flat(dx), xd.size, C, S, Cg,
               half, one, with_silu)
        dgam, dbet = A.empty((C,), np.float64), A.empty((C,), np.float64)
        launch(_param_grads, C, flat(dyd), flat(xd), mean, rstd, gd, bd, dgam, dbet, B, C, S, Cg, half, one, with_silu)
        cast = lambda a: A.asarray(A.to_numpy(a).astype(dt))
        return A.out(dx), cast(dgam), cast(dbet)
    return forward, backward


KERNELS = {
    "group_norm": {1: _pair(1, False), 2: _pair(2, False)},
    "group_norm_silu": {1: _pair(1, True), 2: _pair(2, True)},
}
