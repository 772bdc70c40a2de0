"""BLAS GEMM callable from inside @njit code (for conv2d version 3).

scipy ships its own OpenBLAS (LP64, separate from NumPy's ILP64 one) and exports its
Fortran GEMMs as Cython function pointers; their addresses are registered with LLVM under
our own names (llvmlite add_symbol) and numba calls them by name (types.ExternalFunction),
which, unlike a ctypes pointer baked into the code, lets the calling kernels be cached. So
a parallel loop can run one single-threaded GEMM per batch chunk on data that is still in
that core's cache. That OpenBLAS is pinned to 1 thread (threadpoolctl, called by the
backend's configure_threads) so the GEMMs never spawn threads of their own inside numba's.
NumPy's BLAS (the reference's) is left alone.

gemm(M, N, K, a, lda, b, ldb, c, ldc, beta): row-major C (M, N) = A (M, K) B (K, N)
(+ beta C), with leading dimensions, computed as the column-major C^T = B^T A^T.
transb=True reads B as (N, K) (i.e. uses B^T).
"""
from __future__ import annotations

import llvmlite.binding as ll
import numba
import numpy as np
from numba import njit, prange, types
from numba.extending import get_cython_function_address


def _blas_function(name):
    """scipy's Fortran `name` (13 pointer arguments), callable from numba code by a fixed name."""
    symbol = f"refdiff_scipy_{name}"
    ll.add_symbol(symbol, get_cython_function_address("scipy.linalg.cython_blas", name))
    return types.ExternalFunction(symbol, types.void(*[types.voidptr] * 13))


_sgemm, _dgemm = _blas_function("sgemm"), _blas_function("dgemm")


def pin_scipy_blas_to_one_thread():
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:      # pragma: no cover - then OpenBLAS may oversubscribe, results are the same
        return
    for lib in ThreadpoolController().lib_controllers:
        if "scipy" in lib.filepath and "numpy" not in lib.filepath:
            lib.set_num_threads(1)


@njit(cache=True)
def gemm_t(M, N, K, a, a_off, lda, transa, b, b_off, ldb, transb, c, c_off, ldc, beta):
    """Row-major C[c_off:] (M x N, ld ldc) = op(A) op(B) + beta C, op(A) (M x K), op(B) (K x N);
    transa: A is stored (K x M, ld lda) and read transposed; transb likewise B (N x K, ld ldb).

    a, b, c: 1-D C-contiguous arrays of one dtype (float32 -> sgemm, float64 -> dgemm)."""
    if M == 0 or N == 0:
        return
    ch = np.empty(2, np.uint8)
    ch[0] = 84 if transb else 78               # column-major: C^T = op(B)^T op(A)^T; 'T' / 'N'
    ch[1] = 84 if transa else 78
    ints = np.empty(6, np.int32)
    ints[0], ints[1], ints[2], ints[3], ints[4], ints[5] = N, M, K, ldb, lda, ldc
    if a.itemsize == 4:                         # float32 (else float64)
        sc = np.empty(2, np.float32)
        sc[0], sc[1] = 1.0, beta
        _sgemm(ch[0:].ctypes, ch[1:].ctypes, ints[0:].ctypes, ints[1:].ctypes, ints[2:].ctypes, sc[0:].ctypes,
               b[b_off:].ctypes, ints[3:].ctypes, a[a_off:].ctypes, ints[4:].ctypes, sc[1:].ctypes,
               c[c_off:].ctypes, ints[5:].ctypes)
    else:
        sd = np.empty(2, np.float64)
        sd[0], sd[1] = 1.0, beta
        _dgemm(ch[0:].ctypes, ch[1:].ctypes, ints[0:].ctypes, ints[1:].ctypes, ints[2:].ctypes, sd[0:].ctypes,
               b[b_off:].ctypes, ints[3:].ctypes, a[a_off:].ctypes, ints[4:].ctypes, sd[1:].ctypes,
               c[c_off:].ctypes, ints[5:].ctypes)


@njit(cache=True)
def gemm(M, N, K, a, a_off, lda, b, b_off, ldb, transb, c, c_off, ldc, beta):
    """gemm_t with A read as stored (M x K, ld lda)."""
    gemm_t(M, N, K, a, a_off, lda, False, b, b_off, ldb, transb, c, c_off, ldc, beta)


# --- whole matrix products on numba's threads ---------------------------------------------------
# NumPy's OpenBLAS runs its own thread pool; on a machine shared with other jobs every product
# then waits for both of its threads to be scheduled (measured: a 10 x 90 x 12544 GEMM takes
# 0.4 ms on one thread and 8 ms on two under load; a batch-8 UNet step 2.1 s vs 0.3 s). The
# numba backend therefore never calls it: products run as single-threaded GEMMs, one per
# column chunk (or per chunk of the summed dimension, partials added after) in a numba
# parallel loop, so that numba's threading layer is the only thread pool in play.
_SMALL = 1 << 20        # multiply-adds below which one serial GEMM call beats splitting


@njit(cache=True)
def _mm_serial(a, transa, b, transb, c):
    """c = op(a) op(b), one BLAS call."""
    M, N = c.shape
    K = a.shape[0] if transa else a.shape[1]
    gemm_t(M, N, K, a.reshape(-1), 0, a.shape[1], transa, b.reshape(-1), 0, b.shape[1], transb, c.reshape(-1), 0, N,
           0.0)


@njit(parallel=True, cache=True)
def _mm_par(a, transa, b, transb, c, chunks):
    """c = op(a) op(b), one BLAS call per chunk of c's columns, chunks on numba's threads."""
    M, N = c.shape
    K = a.shape[0] if transa else a.shape[1]
    step = (N + chunks - 1) // chunks
    for t in prange(chunks):
        j0 = t * step
        nc = min(step, N - j0)
        if nc > 0:
            gemm_t(M, nc, K, a.reshape(-1), 0, a.shape[1], transa, b.reshape(-1), j0 * b.shape[1] if transb else j0,
                   b.shape[1], transb, c.reshape(-1), j0, N, 0.0)


@njit(parallel=True, cache=True)
def _mm_nt_par(a, b, part, chunks):
    M, K = a.shape
    N = b.shape[0]
    step = (K + chunks - 1) // chunks
    for t in prange(chunks):
        k0 = t * step
        kc = min(step, K - k0)
        if kc > 0:
            gemm(M, N, kc, a.reshape(-1), k0, K, b.reshape(-1), k0, K, True, part[t].reshape(-1), 0, N, 0.0)
        else:
            part[t, :, :] = 0


def matmul_t(a, transa, b, transb):
    """op(a) @ op(b) (op = transpose where the flag is set) without copying a transpose;
    C-contiguous result, float32 or float64 (both operands alike). Columns of the result split
    over numba's threads, unless the product is small or narrow (then one serial call)."""
    a, b = np.ascontiguousarray(a), np.ascontiguousarray(b, dtype=np.asarray(a).dtype)
    M, K = a.shape[::-1] if transa else a.shape
    N = b.shape[0] if transb else b.shape[1]
    c = np.empty((M, N), a.dtype)
    T = numba.get_num_threads()
    if M * N * K < _SMALL or N < 2 * T:
        _mm_serial(a, transa, b, transb, c)
    else:
        _mm_par(a, transa, b, transb, c, T)
    return c


def matmul(a, b):
    """a (M, K) @ b (K, N)."""
    return matmul_t(a, False, b, False)


def matmul_nt(a, b):
    """a (M, K) @ b (N, K)^T, split over K (the long, summed axis of weight gradients)."""
    a, b = np.ascontiguousarray(a), np.ascontiguousarray(b, dtype=np.asarray(a).dtype)
    M, K = a.shape
    N = b.shape[0]
    T = numba.get_num_threads()
    if M * N * K < _SMALL or K < 2 * T:
        c = np.empty((M, N), a.dtype)
        _mm_serial(a, False, b, True, c)
        return c
    part = np.empty((T, M, N), a.dtype)
    _mm_nt_par(a, b, part, T)
    return part.sum(axis=0)
