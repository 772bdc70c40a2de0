"""refdiff_cuda: accelerated backends that must compute what refdiff's NumPy reference computes.

    get_backend(name, versions=None) -> an object with the ops of refdiff.nn.functional
    (same names, signatures and results), plus `name`, `xp`, `asarray`, `to_numpy`,
    `versions` (op -> version in use), `available_versions`, `fallback` (reference ops
    used as they are) and the sampler steps `ddpm_step`, `em_step` (refdiff/nn/steps.py).

Backends:
    "numpy"       the reference itself (refdiff.backend.REFERENCE)
    "numba"       CPU, @njit(parallel=True) kernels on NumPy arrays     (numba_cpu/)
    "numba-cuda"  @cuda.jit kernels; runs under NUMBA_ENABLE_CUDASIM=1   (numba_cuda/)
    "cupy"        CuPy arrays on the GPU, cuBLAS + fused raw kernels      (cupy_backend/)

`versions` picks kernel versions as in llm.c's dev/cuda: an int k >= 1 (every op at version
k, or its newest below k; 1: every op's literal port) or {op: version}, op being a pair name
("conv2d") or one of its members ("conv2d_forward" selects the pair: forward and backward
share a cache format). Any other value, a version no op has, or an op or version that does
not exist is a TypeError / ValueError naming the op and its versions
(refdiff_cuda._ops.normalise_versions).
Every version is tested against the reference by refdiff_cuda.testing.check_op.
"""
from __future__ import annotations

import os

from ._ops import PAIRS, REQUIRED, check_versions_type, normalise_versions, reference_namespace

__all__ = ["get_backend", "BACKENDS", "PAIRS", "REQUIRED", "backend_status"]

BACKENDS = ("numpy", "numba", "numba-cuda", "cupy")
_CACHE = {}


def _numba(backend):
    try:
        import numba  # noqa: F401
    except ImportError as exc:
        raise ValueError(f"backend {backend!r} needs numba, which is not installed ({exc}); "
                         f"install it with: pip install 'refdiff[numba]'") from None


def _load(name, versions):
    if name == "numpy":        # the reference: version 1 of every op, and nothing else
        normalise_versions(versions, {op: {1: None} for op in PAIRS}, name)
        return reference_namespace()
    if name == "numba":
        _numba(name)
        from .numba_cpu import make_backend
        return make_backend(versions)
    if name == "numba-cuda":
        from .numba_cuda import make_backend   # raises the one clear ValueError itself
        return make_backend(versions)
    if name == "cupy":
        from .cupy_backend import make_backend
        return make_backend(versions)
    raise ValueError(f"unknown backend {name!r}; choose one of {BACKENDS}")


def get_backend(name, versions=None):
    """The backend `name` (cached per (name, versions)); ValueError if it cannot run here,
    TypeError / ValueError naming the op and its versions for a bad `versions`."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {BACKENDS}")
    check_versions_type(versions, name)
    key = (name, repr(sorted(versions.items())) if isinstance(versions, dict) else versions,
           os.environ.get("NUMBA_ENABLE_CUDASIM", ""))
    if key not in _CACHE:
        _CACHE[key] = _load(name, versions)
    return _CACHE[key]


def backend_status():
    """{name: "ok" or the reason it is unavailable} (for reports and test skips)."""
    out = {}
    for name in BACKENDS:
        try:
            get_backend(name)
            out[name] = "ok"
        except ValueError as exc:
            out[name] = str(exc)
    return out
