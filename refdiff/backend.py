"""Which ops a model runs on: the NumPy reference, or an accelerated backend.

A backend is an object carrying the op pairs of `refdiff.nn.functional` under the same
names and signatures, plus `name`, `xp` (the array module: numpy or cupy), `asarray`
(host array -> backend array) and `to_numpy` (backend array -> host array). Models hold
one and call `self.ops.<op>_forward(...)`; they never branch on the backend's name.
"""
from __future__ import annotations

import types

import numpy as np

from .nn import functional as _F


def _reference():
    ns = types.SimpleNamespace(**{k: getattr(_F, k) for k in dir(_F) if not k.startswith("_")})
    ns.name, ns.xp = "numpy", np
    ns.asarray = lambda a, dtype=None: np.asarray(a, dtype=dtype)
    ns.to_numpy = lambda a: np.asarray(a)
    return ns


REFERENCE = _reference()


def get_ops(backend=None):
    """None or "numpy" -> the reference; any other name -> refdiff_cuda.get_backend(name);
    an object already carrying the ops is returned as is."""
    if backend is None or backend == "numpy":
        return REFERENCE
    if isinstance(backend, str):
        try:
            import refdiff_cuda
        except ImportError as exc:  # pragma: no cover - refdiff_cuda ships with refdiff
            raise ValueError(f"backend {backend!r} needs the refdiff_cuda package: {exc}") from None
        return refdiff_cuda.get_backend(backend)
    return backend
