"""The `cupy` backend: CuPy arrays on the GPU (xp = cupy), cuBLAS (cupy.matmul) for every
matrix product, fused CUDA C kernels (RawKernel) for the memory-bound ops.

    version 1   the reference ops themselves (refdiff/nn/functional.py, conv.py, norm.py,
                steps.py): they take their array module from their inputs
                (refdiff/nn/array_module.py), so on CuPy arrays they run on the GPU, line for
                line the specification. time_embedding embeds the host times the models pass
                and moves the result to the device.
    kernels.py  version 2: silu, adam_update, ddpm_step, em_step, conv2d / conv_transpose2d
                (compact im2col and a gather col2im as raw kernels, bias fused), group_norm and
                group_norm_silu (one block per (sample, group), float64 shared-memory sums)
Other reference ops run on host copies (`backend.fallback`, refdiff_cuda._ops.host_fallback).
Untested on a GPU by its author: see benchmarks/gpu_check.sh. Version 1 is tested on the CPU
with a stand-in array module (tests/test_backend_cupy_reference.py).
"""
from __future__ import annotations

import numpy as np

from refdiff.backend import REFERENCE

from .. import _ops


def reference_kernels(cp):
    """Version 1 of every op: {op: {1: the reference functions}} for arrays of module cp."""
    to_numpy, asarray, is_device = _conversions(cp)
    table = {op: {1: tuple(getattr(REFERENCE, n) for n in names)} for op, names in _ops.PAIRS.items()}
    # The models pass the times on the host (they embed them before anything else runs).
    table["time_embedding"] = {1: (_ops.host_fallback(REFERENCE.time_embedding, to_numpy, asarray, is_device),)}
    return table


def _conversions(cp):
    def to_numpy(a):
        return cp.asnumpy(a) if isinstance(a, cp.ndarray) else np.asarray(a)

    def asarray(a, dtype=None):
        return cp.asarray(a, dtype=dtype)

    def is_device(a):
        return isinstance(a, cp.ndarray)
    return to_numpy, asarray, is_device


def build_backend(cp, versions=None, fast=None):
    """The backend on array module cp: version 1 from the reference, `fast` ({op: {version:
    functions}}, kernels.KERNELS on a GPU) on top."""
    table = reference_kernels(cp)
    for op, vs in (fast or {}).items():
        table[op].update(vs)
    to_numpy, asarray, is_device = _conversions(cp)
    return _ops.build("cupy", table, versions, cp, asarray=asarray, to_numpy=to_numpy, is_device=is_device)


def make_backend(versions=None):
    try:
        import cupy as cp
    except ImportError as exc:
        raise ValueError(f"backend 'cupy' needs CuPy, which is not installed ({exc}); "
                         f"install: pip install 'refdiff[cupy]' (cupy-cuda12x)") from None
    try:
        n = cp.cuda.runtime.getDeviceCount()
    except Exception as exc:  # noqa: BLE001 - CUDARuntimeError and friends
        raise ValueError(f"backend 'cupy' needs a CUDA GPU; CuPy sees none ({exc})") from None
    if n < 1:
        raise ValueError("backend 'cupy' needs a CUDA GPU; CuPy sees none")
    from . import kernels
    return build_backend(cp, versions, kernels.KERNELS)
