"""Shared bits of the benchmarks: timing, the machine's float32 GEMM peak, the machine and
commit a result was measured on, and which libraries a process holds."""
from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
import time
from importlib import metadata

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
# The libraries whose thread pools or OpenMP runtimes slow each other inside one process;
# a benchmark worker reports which of them it holds (held_libraries).
WATCHED = ("torch", "numba", "refdiff_cuda", "threadpoolctl")


def median_time(f, repeats):
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts)), ts


def held_libraries():
    """Which of WATCHED this process has imported (sys.modules), sorted."""
    return sorted(m for m in WATCHED if m in sys.modules)


def gemm_peak_gflops(n=2048, repeats=3):
    """float32 GEMM rate of NumPy's BLAS (n x n x n), the machine's practical peak."""
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((n, n), dtype=np.float32), rng.standard_normal((n, n), dtype=np.float32)
    a @ b
    t, _ = median_time(lambda: a @ b, repeats)
    return 2 * n ** 3 / t / 1e9


def _version(dist):
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _commit():
    """HEAD of the repository the benchmarks live in, '+dirty' when tracked files differ."""
    root = os.path.dirname(HERE)
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def environment():
    """The machine, library versions (read from the installed metadata: nothing is imported),
    the commit and the date of a measurement."""
    env = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               commit=_commit(), cpu=_cpu_model(), cpus=os.cpu_count(), machine=platform.machine(),
               load_average=os.getloadavg(), python=platform.python_version(), numpy=np.__version__,
               numba=_version("numba"), torch=_version("torch"))
    if "numba" in sys.modules:        # this process ran numba: say on which threading layer
        env["numba_threading_layer"] = _threading_layer(sys.modules["numba"])
    return env


def _threading_layer(numba):
    """The layer numba's parallel regions ran on (known once one has run), else what is configured."""
    try:
        return numba.threading_layer()
    except ValueError:
        return os.environ.get("NUMBA_THREADING_LAYER", "not started (refdiff_cuda prefers omp)")


def write_json(path, data):
    """Write `data` as JSON atomically (a temporary file renamed over `path`)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, default=float)
        f.write("\n")
    os.replace(tmp, path)
    print(f"wrote {path}")
