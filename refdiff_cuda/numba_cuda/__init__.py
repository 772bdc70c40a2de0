"""The `numba-cuda` backend: @cuda.jit kernels (numba's CUDA target).

Runs on a CUDA GPU, or on the CPU under numba's simulator (NUMBA_ENABLE_CUDASIM=1, which
must be in the environment before numba.cuda is first imported). Arrays: see _arrays.py
(NumPy + per-op transfers without CuPy or under the simulator; CuPy arrays otherwise).

Ops and versions (each module's docstring says what the versions differ in):
    blas.py        gemm 1 (thread per entry), 2 (shared-memory tiles): used by linear,
                   conv2d and conv_transpose2d, whose versions select it
    functional.py  linear 1,2  silu relu concat add_channel_bias time_embedding mse
                   adam_update ddpm_step em_step: 1
    conv.py        conv2d 1,2  conv_transpose2d 1,2  max_pool2d 1
    norm.py        group_norm 1,2  group_norm_silu 1,2
    attention.py   spatial_attention upsample_nearest2x dropout: 1 (literal ports; dropout's
                   mask drawn on the host as the reference draws it)
Every op takes the array container (_arrays.Arrays) as its first argument; make_backend
binds it (bind_kernels), so two backends (host and CuPy containers) share no state.
Falls back to the host reference explicitly (copies in and out): `backend.fallback`.
"""
from __future__ import annotations

import functools
import os
import sys


def _cuda():
    """numba.cuda, simulator or real; one clear ValueError when neither can run."""
    try:
        import numba
    except ImportError as exc:
        raise ValueError(f"backend 'numba-cuda' needs numba ({exc}); install: pip install 'refdiff[cuda]'") from None
    sim_env = os.environ.get("NUMBA_ENABLE_CUDASIM", "") == "1"
    if sim_env and not numba.config.ENABLE_CUDASIM:
        if "numba.cuda" in sys.modules:
            raise ValueError("backend 'numba-cuda': NUMBA_ENABLE_CUDASIM=1 was set after numba.cuda was imported "
                             "in this process; set it before (e.g. in the environment of the process)")
        numba.config.reload_config()          # the variable was set after `import numba`
    try:
        from numba import cuda
    except ImportError as exc:
        raise ValueError(f"backend 'numba-cuda' needs numba's CUDA target ({exc}); "
                         f"install: pip install 'refdiff[cuda]'") from None
    if numba.config.ENABLE_CUDASIM:
        return cuda, True
    try:
        ok = cuda.is_available()
    except Exception as exc:  # noqa: BLE001 - driver errors come in many types
        ok, why = False, str(exc)
    else:
        why = "numba.cuda.is_available() is False: no CUDA driver or GPU found"
    if not ok:
        raise ValueError(f"backend 'numba-cuda' needs a CUDA GPU ({why}); set NUMBA_ENABLE_CUDASIM=1 to run "
                         f"its kernels on the CPU simulator instead")
    return cuda, False


def _has_cupy_gpu():
    try:
        import cupy
        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # noqa: BLE001 - not installed, or no usable device
        return False


def bind_kernels(A, kernels):
    """{op: {version: functions of (A, ...)}} -> the same functions with A bound: the ops of
    one backend, whose arrays live in container A."""
    def bind(f):
        return functools.update_wrapper(functools.partial(f, A), f)
    return {op: {v: tuple(bind(f) for f in fs) for v, fs in vs.items()} for op, vs in kernels.items()}


def make_backend(versions=None):
    cuda, sim = _cuda()
    from .. import _ops
    from ._arrays import Arrays
    from . import attention, conv, functional, norm
    A = Arrays(cuda, "host" if sim or not _has_cupy_gpu() else "cupy")
    kernels = bind_kernels(A, {**functional.KERNELS, **conv.KERNELS, **norm.KERNELS, **attention.KERNELS})
    return _ops.build("numba-cuda", kernels, versions, A.xp, asarray=A.asarray, to_numpy=A.to_numpy,
                      is_device=A.is_on_device if A.mode == "cupy" else None,
                      simulator=sim, container=A.mode)
