"""Matrix products as @cuda.jit kernels (numba-cuda has no cuBLAS binding of its own).

    C (M, N) = op(A) op(B), A read as a[i sam + k sak], B as b[k sbk + j sbn]

so a transposed operand is just other strides (no copy). Both versions sum over k in
ascending order with an accumulator of the arrays' dtype, so they give identical results;
the NumPy reference (BLAS) sums in its own blocked order, hence the float tolerances.
  version 1  one thread per C entry, operands read from global memory (a literal port of
             C[i, j] = sum_k A[i, k] B[k, j]);
  version 2  16 x 16 tiles staged in shared memory: each A/B entry is read from global
             memory N/16 resp. M/16 times instead of N resp. M times.
"""
from __future__ import annotations

import numpy as np
from numba import config, cuda, float32, float64



TILE = 4 if config.ENABLE_CUDASIM else 16      # small tiles keep the simulator's thread count down


@cuda.jit
def _gemm_v1(a, sam, sak, b, sbk, sbn, c, M, N, K, zero):
    j, i = cuda.grid(2)                  # x -> column: neighbouring threads write neighbours
    if i < M and j < N:
        acc = zero
        for k in range(K):
            acc += a[i * sam + k * sak] * b[k * sbk + j * sbn]
        c[i * N + j] = acc


def _make_tiled(dt):
    @cuda.jit
    def gemm_v2(a, sam, sak, b, sbk, sbn, c, M, N, K, zero):
        sA = cuda.shared.array((TILE, TILE), dtype=dt)
        sB = cuda.shared.array((TILE, TILE), dtype=dt)
        tx, ty = cuda.threadIdx.x, cuda.threadIdx.y
        col = cuda.blockIdx.x * TILE + tx
        row = cuda.blockIdx.y * TILE + ty
        acc = zero
        for t0 in range(0, K, TILE):
            sA[ty, tx] = a[row * sam + (t0 + tx) * sak] if (row < M and t0 + tx < K) else zero
            sB[ty, tx] = b[(t0 + ty) * sbk + col * sbn] if (t0 + ty < K and col < N) else zero
            cuda.syncthreads()
            for k in range(TILE):
                acc += sA[ty, k] * sB[k, tx]
            cuda.syncthreads()
        if row < M and col < N:
            c[row * N + col] = acc
    return gemm_v2


_TILED = {np.dtype(np.float32): _make_tiled(float32), np.dtype(np.float64): _make_tiled(float64)}


def gemm(A, a, ta, b, tb, M, N, K, dtype, version):
    """Device (M, N) = op(a) op(b); a is (M, K) (or (K, M) if ta), b (K, N) (or (N, K) if tb),
    both C-contiguous device arrays of `dtype`."""
    sam, sak = (1, M) if ta else (K, 1)
    sbk, sbn = (1, K) if tb else (N, 1)
    c = A.empty((M, N), dtype)
    blocks = ((N + TILE - 1) // TILE, (M + TILE - 1) // TILE)
    if M and N:
        kern = _gemm_v1 if version == 1 else _TILED[np.dtype(dtype)]
        kern[blocks, (TILE, TILE)](a.reshape(a.size), sam, sak, b.reshape(b.size), sbk, sbn, c.reshape(M * N),
                                   M, N, K, np.dtype(dtype).type(0))
    return c



