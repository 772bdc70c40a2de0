"""What the numba backend does to the process and the disk: its compiled kernels are cached
in a user cache directory (never the installed package) and a second process loads every
one of them instead of compiling (the SIMD kernels' callers included); importing it changes
no thread setting, building the backend makes them (configure_threads)."""
import os
import platform
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
    from refdiff_cuda.numba_cpu import _blas, conv, conv_v4, conv_v5, convt_v3, functional, fused, fused_v3, norm, silu_v3
    for mod in (_blas, conv, conv_v4, conv_v5, convt_v3, functional, fused, fused_v3, norm):
        for name, f in vars(mod).items():
            if isinstance(f, CPUDispatcher):
                yield f"{mod.__name__}.{name}", f
    dt = np.dtype(np.float32)
    yield "conv_v5._forward_loop", conv_v5._forward_loop(dt)
    yield "conv_v5._dw_loop", conv_v5._dw_loop(dt)
    yield "silu_v3._loop", silu_v3._loop()
    yield "fused_v3._loop", fused_v3._loop()[0]
    yield "fused_v3._loop dense", fused_v3._loop()[1]


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


_FAULTS = r"""
import resource, numpy as np
import refdiff_cuda
from refdiff.nn import make_model
m = make_model("unet-seed", backend="numba", dtype=np.float32)
x, t = np.random.default_rng(0).standard_normal((32, 1, 28, 28)).astype(np.float32), np.full(32, 0.5)


def step():
    y = m.forward(x, t)
    m.backward(np.ones_like(y))


for _ in range(2):
    step()
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    step()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / 3)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_building_the_backend_keeps_freed_activations_in_the_heap():
    """configure_memory: with glibc's defaults a batch-32 unet-seed forward and backward faults
    its fresh activations and gradients in again on every step (~13,000 pages measured); once
    make_backend has set mallopt, a step reuses the heap's freed blocks: at most a twentieth of
    the faults remain (REFDIFF_KEEP_MALLOC=1 leaves glibc's defaults, the control)."""
    from refdiff_cuda.numba_cpu import MALLOC_SETTINGS, configure_memory
    assert configure_memory({"REFDIFF_KEEP_MALLOC": "1"}) == {}
    assert configure_memory({}) == {name: value for name, (_, value) in MALLOC_SETTINGS.items()}
    faults = {}
    for keep in ("0", "1"):
        env = dict(os.environ, REFDIFF_KEEP_MALLOC=keep, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        proc = subprocess.run([sys.executable, "-c", _FAULTS], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        faults[keep] = float(proc.stdout.split()[-1])
    # with the settings, 0 to ~130 pages a step remain (measured, from run to run; not traced: memory
    # that glibc's heap does not serve, such as Python's own mmapped small-object arenas, would do it)
    assert faults["1"] > 1000 and faults["0"] < faults["1"] / 20, faults
