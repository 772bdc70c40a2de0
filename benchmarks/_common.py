"""Shared bits of the benchmarks: timing, the machine's float32 GEMM peak, environment."""
from __future__ import annotations

import json
import os
import platform
import time

import numpy as np


def median_time(f, repeats):
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts)), ts


def set_threads(n):
    """Use n threads in numba's parallel loops, NumPy's OpenBLAS (the reference) and torch.
    scipy's OpenBLAS stays at 1 thread: refdiff_cuda's numba conv version 3 calls it from
    inside numba's threads."""
    import numba
    numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    try:
        from threadpoolctl import ThreadpoolController
        for lib in ThreadpoolController().lib_controllers:
            if "numpy" in lib.filepath:
                lib.set_num_threads(n)
    except ImportError:
        pass
    try:
        import torch
        torch.set_num_threads(n)
    except ImportError:
        pass


def gemm_peak_gflops(n=2048, repeats=3):
    """float32 GEMM rate of NumPy's BLAS (n x n x n), the machine's practical peak."""
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((n, n), dtype=np.float32), rng.standard_normal((n, n), dtype=np.float32)
    a @ b
    t, _ = median_time(lambda: a @ b, repeats)
    return 2 * n ** 3 / t / 1e9


def _threading_layer(numba):
    """The layer numba's parallel regions ran on (known once one has run), else what is configured."""
    try:
        return numba.threading_layer()
    except ValueError:
        return os.environ.get("NUMBA_THREADING_LAYER", "not started (refdiff_cuda prefers omp)")


def environment():
    import numba
    env = dict(python=platform.python_version(), numpy=np.__version__, numba=numba.__version__,
               cpus=os.cpu_count(), load_average=os.getloadavg(), machine=platform.machine(),
               numba_threading_layer=_threading_layer(numba))
    try:
        import torch
        env["torch"] = torch.__version__
    except ImportError:
        env["torch"] = None
    return env


def write_json(path, data):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f, indent=2, default=float)
        f.write("\n")
    print(f"wrote {path}")
