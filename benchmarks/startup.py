"""Start-up of the numba backend: seconds from `import refdiff_cuda` to the end of the first
unet-seed training step (batch 8, float32, Adam), on a first start (empty kernel cache) and
on the starts after it (the kernels numba cached on disk, outside the package:
refdiff_cuda/numba_cpu/_cache.py). Each start is a fresh process; a second step in the same
process gives the step's own cost, so overhead = first step's end - one step.

    python benchmarks/startup.py [--starts 3] [--threads 2] [--out results/startup_numba.json]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import HERE, environment, write_json  # noqa: E402

CHILD = r"""
import json, time
t0 = time.perf_counter()
import numpy as np
import refdiff_cuda
from refdiff.nn import make_model
from refdiff.optim import Adam
be = refdiff_cuda.get_backend("numba")
m = make_model("unet-seed", dtype=np.float32, backend="numba", seed=0)
opt = Adam(m, lr=1e-3)
rng = np.random.default_rng(0)
x = rng.standard_normal((8, 1, 28, 28)).astype(np.float32)
t = rng.uniform(0, 1, 8)
def step():
    m.zero_grad()
    loss, c = be.mse_forward(m.forward(x, t), x)
    m.backward(be.mse_backward(c))
    opt.step()
t1 = time.perf_counter(); step(); t2 = time.perf_counter(); step(); t3 = time.perf_counter()
print(json.dumps(dict(imports_and_model=t1 - t0, first_step_end=t2 - t0, one_step=t3 - t2,
                      overhead=t2 - t0 - (t3 - t2))))
"""


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--starts", type=int, default=3, help="fresh processes after the first (cached) start")
    ap.add_argument("--threads", type=int, default=2, help="NUMBA_NUM_THREADS of each start")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "startup_numba.json"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, XDG_CACHE_HOME=cache, NUMBA_NUM_THREADS=str(args.threads))
        env.pop("NUMBA_CACHE_DIR", None)
        runs = []
        for k in range(1 + args.starts):
            out = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, check=True)
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"{'first' if k == 0 else 'cached'} start: first step ends at {runs[-1]['first_step_end']:.2f} s "
                  f"(one step {runs[-1]['one_step']:.2f} s)")
    write_json(args.out, dict(benchmark="numba start-up: import to the end of the first unet-seed training step "
                                        "(batch 8, float32)", threads=args.threads, first_start=runs[0],
                              cached_starts=runs[1:], environment=environment()))


if __name__ == "__main__":
    main()
