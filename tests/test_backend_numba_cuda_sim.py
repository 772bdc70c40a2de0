"""Runs test_backend_ops.py's numba-cuda cases under numba's CUDA simulator in a subprocess.

NUMBA_ENABLE_CUDASIM=1 only takes effect if it is set before numba.cuda is first imported,
and it swaps the whole numba.cuda module for the simulator; a subprocess keeps that out of
the rest of the suite. Verified with numba 0.68.1 (its built-in CUDA target; `pip install
numba-cuda` replaces it with NVIDIA's package, whose simulator works the same way).
"""
import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("numba")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("NUMBA_ENABLE_CUDASIM") == "1",
                    reason="already under the simulator: test_backend_ops.py runs numba-cuda in this process")
def test_numba_cuda_kernels_under_the_simulator():
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x",
                           os.path.join(ROOT, "tests", "test_backend_ops.py"), "-k", "numba-cuda"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"simulator run failed:\n{out[-6000:]}"
    passed = re.search(r"(\d+) passed", out)
    assert passed and int(passed.group(1)) >= 20 and "skipped" not in out, f"simulator tests did not run:\n{out[-3000:]}"
