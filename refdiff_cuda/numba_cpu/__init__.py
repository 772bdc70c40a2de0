"""The `numba` backend: @njit CPU kernels; arrays are NumPy arrays (xp = numpy).

Ops: every op of refdiff_cuda._ops.REQUIRED, in versions (1 = literal serial port of the
reference, 2 = parallel, fused, channel-major; see each module's docstring):

    functional.py  linear 1,2  silu 1,2  relu 1,2  concat 1,2  add_channel_bias 1,2
                   time_embedding 1  mse 1  adam_update 1,2  ddpm_step 1,2  em_step 1,2
    conv.py        conv2d 1,2,3  conv_transpose2d 1,2  max_pool2d 1
                   (3 = im2col fused with a per-chunk GEMM in the core's L2 cache)
    conv_v4.py     conv2d 4 (wide-row im2col per chunk; a dense matrix for tiny images)
    conv_v5.py     conv2d 5 (implicit GEMM by SIMD micro-kernels, _simd.py: LLVM IR compiled by
                   llvmlite; strided convs as polyphase stride-1 convs; tiny images: v4's dense path)
    conv_v6.py     conv2d 6 (version 5, with 1x1 convs as one GEMM on the channel-major buffer)
    conv_v7.py     conv2d 7 (version 6, with strided convs in a polyphase frame built in one pass and
                   read tap by tap: any kernel, no zero taps)
    convt_v3.py    conv_transpose2d 3 (conv2d v5 of the zero-upsampled input)
    convt_v4.py    conv_transpose2d 4 (strided: one conv2d of the input with s^2 Cout channels, polyphase)
    silu_v3.py     silu 3 (float32 forward by a SIMD exp/sigmoid kernel, _simd.py)
    norm.py        group_norm 1,2  group_norm_silu 1,2
    fused.py       conv2d_silu 1,2  group_norm_conv2d 1,2 (refdiff/nn/fused.py's pairs, for the
                   models' inference forward: the norm, the conv, bias and SiLU in one kernel)
    fused_v3.py    conv2d_silu 3  group_norm_conv2d 3 (version 2's arithmetic one sample at a time,
                   in the core's caches)
    attention.py   spatial_attention 1,2  upsample_nearest2x 1,2  dropout 1,2 (mask drawn on the host)
    _blas.py       matrix products: single-threaded BLAS calls on numba's threads

Threads: numba's threading layer (omp where available, see configure_threads) is the only
thread pool; scipy's OpenBLAS, which some kernels call, is pinned to one thread, and NumPy's
is never called by versions >= 2. make_backend makes these settings (configure_threads),
not the import. Results of reductions split across threads (weight gradients) depend on the
thread count in the last bits; they agree with the reference within refdiff_cuda.testing.TOL.
Not thread-safe: do not call the backend from several Python threads at once.
Memory: make_backend also sets glibc's malloc to keep freed activations in the heap
(configure_memory; REFDIFF_KEEP_MALLOC=1 to leave glibc's defaults).

Falls back to the reference (same arrays, no copy): sigmoid, tanh, leaky_relu, the loss
ops of refdiff/nn/lossfn.py and the naive twins of conv and attention (`backend.fallback` lists them).
JIT cache: every @njit kernel is cached (cache=True) in _cache.cache_dir() (NUMBA_CACHE_DIR,
else $XDG_CACHE_HOME/refdiff/numba or ~/.cache/refdiff/numba), never in the package, so a
second process loads them instead of compiling; only the SIMD kernels' LLVM IR (_simd.py,
0.1-0.3 s) is compiled in every process.
Dtypes: the kernels are compiled for float32 and float64; a call that fails on another floating
dtype (float16) is one TypeError naming the op and the dtype (_naming_dtype).
Non-finite inputs: conv results holding NaN are recomputed by version 1, so that NaN and inf
land where the reference's do (conv_v4._v1_redo).
"""
from __future__ import annotations

import functools
import os

import numba
import numpy as np

from .. import _ops
from ._cache import caching_into

with caching_into():      # every cached kernel of these modules goes to the user cache directory
    from . import (_blas, attention, conv, conv_v4, conv_v5, conv_v6, conv_v7, convt_v3, convt_v4, functional, fused,
                   fused_v3, norm, silu_v3)


def configure_threads():
    """The numba backend's thread settings, made by make_backend before any kernel runs.

    Threading layer: OpenMP where numba has it, else its own "workqueue", unless the user
    chose one (NUMBA_THREADING_LAYER / NUMBA_THREADING_LAYER_PRIORITY). Measured on the quiet
    2-core machine (benchmarks/results/threading_layer.json): a unet-seed training step took
    0.52 s with omp and 0.62-0.94 s with workqueue, whose second worker often sat idle (a
    2-way split GEMM ran 1.36x, not 2x, faster). On a machine shared with other CPU jobs it is
    the other way round: libgomp's sleeping workers wait a scheduler slice to wake, and an
    empty parallel region cost 12 ms with omp against 55 us with workqueue (a step launches
    ~700 regions); there, set NUMBA_THREADING_LAYER=workqueue. Takes effect only before the
    process's first parallel call.
    scipy's OpenBLAS: pinned to one thread, because conv2d version 3 and the _blas GEMMs call
    it from inside numba's threads (threadpoolctl; NumPy's BLAS is left alone).
    """
    if "NUMBA_THREADING_LAYER" not in os.environ and "NUMBA_THREADING_LAYER_PRIORITY" not in os.environ:
        numba.config.THREADING_LAYER_PRIORITY = ["omp", "workqueue", "tbb"]
    _blas.pin_scipy_blas_to_one_thread()


# glibc's mallopt parameters (malloc.h) and the values configure_memory sets
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
MALLOC_SETTINGS = {"M_MMAP_THRESHOLD": (_M_MMAP_THRESHOLD, 32 << 20),   # glibc's largest allowed value
                   "M_TRIM_THRESHOLD": (_M_TRIM_THRESHOLD, 1 << 30)}


def configure_memory(environ=os.environ):
    """glibc's malloc keeps freed activations for reuse instead of returning them to the kernel.

    By default glibc serves a large block (from 128 KB, a threshold it raises as blocks are
    freed) by a fresh mmap, and gives the top of the heap back once 2x that is free; the next
    array of that size then faults in every page again, zero-filled by the kernel. Measured
    with glibc's defaults on 2 cores (benchmarks/page_faults.py): a unet-seed forward and
    backward at batch 128 took ~46,000 such page faults (180 MB) and 90-180 ms of system time
    per step; with these settings, 1 and ~5 ms. Here blocks up to 32 MB come
    from the heap, which is trimmed only past 1 GB free: the process keeps its peak heap.
    Process-wide, so it is made where the backend is built (make_backend), and skipped when
    REFDIFF_KEEP_MALLOC=1 is set, or where the C library has no mallopt (not glibc).
    Returns {setting: value} for what was set, {} when nothing was."""
    import ctypes
    if environ.get("REFDIFF_KEEP_MALLOC") == "1":
        return {}
    try:
        mallopt = ctypes.CDLL(None).mallopt
        ctypes.CDLL(None).gnu_get_libc_version      # glibc's own; other C libraries' mallopt differ
    except (OSError, AttributeError, TypeError):    # pragma: no cover - not glibc (Windows: TypeError)
        return {}
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return {name: value for name, (param, value) in MALLOC_SETTINGS.items() if mallopt(param, value) == 1}


KERNELS = {**functional.KERNELS, **conv.KERNELS, **norm.KERNELS, **attention.KERNELS}
KERNELS["conv2d"] = {**conv.KERNELS["conv2d"], 4: (conv_v4.conv2d_forward_v4, conv_v4.conv2d_backward_v4),
                     5: (conv_v5.conv2d_forward_v5, conv_v5.conv2d_backward_v5),
                     6: (conv_v6.conv2d_forward_v6, conv_v6.conv2d_backward_v6),
                     7: (conv_v7.conv2d_forward_v7, conv_v7.conv2d_backward_v7)}
KERNELS["conv_transpose2d"] = {**conv.KERNELS["conv_transpose2d"],
                               3: (convt_v3.conv_transpose2d_forward_v3, convt_v3.conv_transpose2d_backward_v3),
                               4: (convt_v4.conv_transpose2d_forward_v4, convt_v4.conv_transpose2d_backward_v4)}
KERNELS["silu"] = {**functional.KERNELS["silu"], 3: (silu_v3.silu_forward_v3, silu_v3.silu_backward_v3)}
FUSED = {op: {**fused.KERNELS[op], **fused_v3.KERNELS[op]} for op in fused.KERNELS}   # not in refdiff_cuda.PAIRS


def make_backend(versions=None):
    configure_threads()
    configure_memory()
    fused_versions = versions
    if isinstance(versions, dict):     # the fused pairs are not in refdiff_cuda.PAIRS: chosen here
        fused_versions = {k: v for k, v in versions.items() if k in FUSED}
        versions = {k: v for k, v in versions.items() if k not in FUSED}
    ns = _ops.build("numba", KERNELS, versions, np,
                    asarray=lambda a, dtype=None: np.asarray(a, dtype=dtype),
                    to_numpy=lambda a: np.asarray(a))
    _add_fused(ns, fused_versions)
    from refdiff.nn.fused import FUSED_PAIRS
    for names in list(_ops.PAIRS.values()) + list(FUSED_PAIRS.values()):
        for name in names:
            setattr(ns, name, _naming_dtype(name, getattr(ns, name)))
    return ns


DTYPES = (np.dtype(np.float32), np.dtype(np.float64))     # the dtypes the kernels are compiled for


def _unsupported_dtype(values):
    """The first floating or complex array dtype among values (lists looked into, as concat takes)
    that is not one of DTYPES, else None."""
    for v in values:
        if isinstance(v, (list, tuple)):
            bad = _unsupported_dtype(v)
            if bad is not None:
                return bad
        elif isinstance(v, np.ndarray) and v.dtype.kind in "fc" and v.dtype.newbyteorder("=") not in DTYPES:
            return v.dtype
    return None


def _naming_dtype(name, f):
    """f, where a failure on an array of a dtype the kernels lack (float16, complex, ...) becomes
    one TypeError naming the op and the dtype: the kernels' own errors there (a KeyError from a
    table of kernels, numba's NotImplementedError) named neither. Nothing is checked on the way
    in: an op that works on such arrays still does, and a call that succeeds costs nothing more."""
    @functools.wraps(f)
    def op(*args, **kwargs):
        try:
            return f(*args, **kwargs)
        except Exception as exc:
            bad = _unsupported_dtype(list(args) + list(kwargs.values()))
            if bad is None:
                raise
            raise TypeError(f"numba backend: {name} takes float32 or float64 arrays; got {bad}") from exc
    return op


def _add_fused(ns, versions):
    """The fused pairs of refdiff.nn.fused (FUSED_PAIRS) on the backend `ns`: versions None
    (the newest), an int k (the newest <= k) or {op: version}, as for every other op."""
    from refdiff.nn.fused import FUSED_PAIRS
    if isinstance(versions, dict):
        chosen = _ops.normalise_versions(versions, FUSED, "numba")
    else:
        chosen = {op: max(v for v in vs if versions is None or v <= versions) for op, vs in FUSED.items()}
    for op, ver in chosen.items():
        for name, f in zip(FUSED_PAIRS[op], FUSED[op][ver]):
            setattr(ns, name, f)
    ns.versions.update(chosen)
    ns.available_versions.update({op: sorted(v) for op, v in FUSED.items()})
