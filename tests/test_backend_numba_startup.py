"""What the numba backend does to the process and the disk: its compiled kernels are cached
in a user cache directory (never the installed package) and a second process loads every
one of them instead of compiling (the SIMD kernels' callers included); importing it changes
no thread setting, building the backend makes them (configure_threads)."""
import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("numba")

import refdiff_cuda  # noqa: E402
from refdiff_cuda.numba_cpu import _cache  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("environ, want", [
    ({"NUMBA_CACHE_DIR": "/n", "XDG_CACHE_HOME": "/x"}, "/n"),
    ({"XDG_CACHE_HOME": "/x"}, "/x/refdiff/numba"),
    ({"XDG_CACHE_HOME": "", "NUMBA_CACHE_DIR": ""}, os.path.join(os.path.expanduser("~"), ".cache", "refdiff", "numba")),
])
def test_cache_dir(environ, want):
    assert _cache.cache_dir(environ) == want


def _dispatchers():
    from numba.core.registry import CPUDispatcher
    from refdiff_cuda.numba_cpu import _blas, conv, conv_v4, conv_v5, convt_v3, functional, norm, silu_v3
    for mod in (_blas, conv, conv_v4, conv_v5, convt_v3, functional, norm):
        for name, f in vars(mod).items():
            if isinstance(f, CPUDispatcher):
                yield f"{mod.__name__}.{name}", f
    dt = np.dtype(np.float32)
    yield "conv_v5._forward_loop", conv_v5._forward_loop(dt)
    yield "conv_v5._dw_loop", conv_v5._dw_loop(dt)
    yield "silu_v3._loop", silu_v3._loop()


def test_every_kernel_is_cached_outside_the_package():
    package = os.path.dirname(refdiff_cuda.__file__)
    where = os.path.realpath(_cache.cache_dir())
    found = dict(_dispatchers())
    assert len(found) > 40
    for name, f in found.items():
        path = os.path.realpath(getattr(f._cache, "_cache_path", ""))
        assert path.startswith(where) and not path.startswith(package), f"{name} is cached in {path!r}"


_CHILD = r"""
import numba, numpy as np
try:
    from threadpoolctl import threadpool_info      # optional, as in _blas.pin_scipy_blas_to_one_thread
except ImportError:
    threadpool_info = lambda: [{"filepath": "scipy", "num_threads": 1}]
layer = list(numba.config.THREADING_LAYER_PRIORITY)
scipy_blas = lambda: [i["num_threads"] for i in threadpool_info() if "scipy" in i["filepath"] and "numpy" not in i["filepath"]]
import refdiff_cuda
from refdiff_cuda.numba_cpu import conv_v5, silu_v3
assert list(numba.config.THREADING_LAYER_PRIORITY) == layer, "threading layer changed at import"
be = refdiff_cuda.get_backend("numba")
assert numba.config.THREADING_LAYER_PRIORITY[0] == "omp", "make_backend did not set the threading layer"
assert scipy_blas() == [1], scipy_blas()
x = np.random.default_rng(0).standard_normal((2, 3, 9, 9)).astype(np.float32)
w = np.ones((4, 3, 3, 3), np.float32)
y, c = be.conv2d_forward(x, w, None, 1, 1)
be.conv2d_backward(y, c)
be.silu_forward(x)
dt = np.dtype(np.float32)
for f in (conv_v5._forward_loop(dt), conv_v5._dw_loop(dt), silu_v3._loop()):
    assert f.stats.cache_hits and not f.stats.cache_misses, (f.py_func.__qualname__, f.stats)
print("ok")
"""


def test_a_second_process_loads_the_simd_loops_from_the_cache():
    """This process compiles (or loads) the loops that call the SIMD kernels; a fresh process
    must then find all three in the cache (a closure's cache entry is keyed by its pickled
    cells, which must pickle the same way in every process)."""
    be = refdiff_cuda.get_backend("numba")
    x = np.random.default_rng(0).standard_normal((2, 3, 9, 9)).astype(np.float32)
    y, c = be.conv2d_forward(x, np.ones((4, 3, 3, 3), np.float32), None, 1, 1)
    be.conv2d_backward(y, c)
    be.silu_forward(x)
    env = {k: v for k, v in os.environ.items() if not k.startswith("NUMBA_THREADING_LAYER")}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", _CHILD], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stdout + proc.stderr[-3000:]
