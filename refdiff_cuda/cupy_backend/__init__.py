"""The `cupy` backend: CuPy arrays on the GPU (xp = cupy), cuBLAS (cupy.matmul) for every
matrix product, fused CUDA C kernels (RawKernel) for the memory-bound ops.

    ported.py   version 1 of every op: the reference's code with numpy -> cupy, line by line
                (same im2col-by-strided-view, per-tap col2im, two-pass group norm)
    kernels.py  version 2: silu, adam_update, ddpm_step, em_step, conv2d / conv_transpose2d
                (compact im2col and a gather col2im as raw kernels, bias fused), group_norm and
                group_norm_silu (one block per (sample, group), float64 shared-memory sums)
Other reference ops run on host copies (`backend.fallback`).
Untested on a GPU by its author: see benchmarks/gpu_check.sh.
"""
from __future__ import annotations


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
    from .. import _ops
    from . import kernels, ported

    def host_fallback(f):
        def g(*args, **kwargs):
            conv = lambda a: [cp.asnumpy(x) if isinstance(x, cp.ndarray) else x for x in a] if isinstance(a, list) \
                else (cp.asnumpy(a) if isinstance(a, cp.ndarray) else a)
            out = f(*[conv(a) for a in args], **{k: conv(v) for k, v in kwargs.items()})
            back = lambda r: cp.asarray(r) if hasattr(r, "shape") and hasattr(r, "dtype") else r
            return tuple(back(r) for r in out) if isinstance(out, tuple) else back(out)
        g.__name__ = f.__name__
        return g

    table = {op: dict(vs) for op, vs in ported.KERNELS.items()}
    for op, vs in kernels.KERNELS.items():
        table.setdefault(op, {}).update(vs)
    return _ops.build("cupy", table, versions, cp, asarray=lambda a, dtype=None: cp.asarray(a, dtype=dtype),
                      to_numpy=lambda a: cp.asnumpy(a) if isinstance(a, cp.ndarray) else __import__("numpy").asarray(a),
                      wrap_fallback=host_fallback)
