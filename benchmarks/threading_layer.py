"""numba's threading layer (omp vs workqueue) on one unet-seed training step of the numba backend.

    python benchmarks/threading_layer.py [--rounds 3] [--steps 8] [--batch 128]
                                         [--out benchmarks/results/threading_layer.json]

The layer is fixed per process, so each round starts one process per layer, in turn (the
machine's load drifts: alternating keeps the comparison fair), and each process times
`--steps` steps after one warm-up step. Reports every step's seconds and the medians.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
CHILD = r"""
import json, sys, time
sys.path.insert(0, {here!r}); sys.path.insert(0, {root!r})
import numba, refdiff_cuda
from train_step import _data, refdiff_step
_, step = refdiff_step("numba", *_data({batch}))
step()
ts = []
for _ in range({steps}):
    t0 = time.perf_counter(); step(); ts.append(time.perf_counter() - t0)
print(json.dumps(dict(layer=numba.threading_layer(), seconds=ts)))
"""


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--layers", default="omp,workqueue")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "threading_layer.json"))
    a = ap.parse_args(argv)
    from _common import environment, write_json
    code = CHILD.format(here=HERE, root=os.path.dirname(HERE), batch=a.batch, steps=a.steps)
    runs = {k: [] for k in a.layers.split(",")}
    for _ in range(a.rounds):
        for layer in runs:
            env = dict(os.environ, NUMBA_THREADING_LAYER=layer, NUMBA_NUM_THREADS=os.environ.get("NUMBA_NUM_THREADS", "2"))
            out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
            res = json.loads(out.stdout.strip().splitlines()[-1])
            if res["layer"] != layer:
                raise RuntimeError(f"asked for threading layer {layer}, numba ran on {res['layer']}")
            runs[layer].append(res["seconds"])
    med = {k: float(np.median(np.concatenate(v))) for k, v in runs.items()}
    for k, v in med.items():
        print(f"{k:>10}: median {v:.3f} s/step over {a.rounds} x {a.steps} steps")
    write_json(a.out, dict(benchmark="unet-seed training step, numba backend, by numba threading layer",
                           batch=a.batch, rounds=a.rounds, steps=a.steps, seconds_median=med,
                           seconds_all=runs, environment=environment()))


if __name__ == "__main__":
    main()
