"""Sampler error alone: reverse-time sampling of a Gaussian mixture with its EXACT score.

For each SDE and sampler, draws n points, and reports the Fréchet distance and sliced
W1 to independent real samples, next to the real-vs-real floor (both averaged over
`pairs` real sets). Writes benchmarks/results/exact_score.json (with the machine, commit
and date). The results quoted in docs/sdes-and-samplers.md use --n 5000.

    python benchmarks/exact_score.py [--n 20000] [--steps 1000] [--pairs 4]
"""
import argparse
import os
import sys
import time

import numpy as np

from refdiff import metrics, samplers
from refdiff.data import GaussianMixture
from refdiff.ring import SDE_DEFAULTS
from refdiff.sde import make_sde

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "exact_score.json"))
    a = ap.parse_args()
    gmm, rows = GaussianMixture.default(), []
    for name in ("ou", "vp", "subvp", "ve"):
        sde = make_sde(name, **SDE_DEFAULTS[name])
        for sampler in ("em", "ode"):
            t0 = time.perf_counter()
            x = samplers.SAMPLERS[sampler](sde, lambda x, t: gmm.score(x, t, sde), (a.n, 2), a.steps,
                                           np.random.default_rng(0))
            secs = time.perf_counter() - t0
            rng = np.random.default_rng(1)
            sw = lambda p, q: metrics.sliced_wasserstein(p, q, 256, np.random.default_rng(2))
            g_fd, g_sw, f_fd, f_sw = [], [], [], []
            for _ in range(a.pairs):
                r, p, q = gmm.sample(a.n, rng), gmm.sample(a.n, rng), gmm.sample(a.n, rng)
                g_fd.append(metrics.frechet_distance(x, r)), g_sw.append(sw(x, r))
                f_fd.append(metrics.frechet_distance(p, q)), f_sw.append(sw(p, q))
            row = dict(sde=name, sampler=sampler, steps=a.steps, n=a.n, seconds=secs,
                       frechet_distance=np.mean(g_fd), frechet_floor=np.mean(f_fd),
                       sliced_wasserstein=np.mean(g_sw), sliced_wasserstein_floor=np.mean(f_sw))
            row["fd_ratio"] = row["frechet_distance"] / row["frechet_floor"]
            row["sw_ratio"] = row["sliced_wasserstein"] / row["sliced_wasserstein_floor"]
            rows.append({k: float(v) if isinstance(v, np.floating) else v for k, v in row.items()})
            print(f"{name:6s} {sampler:4s} FD ratio {row['fd_ratio']:.2f}  SW ratio {row['sw_ratio']:.2f}  ({secs:.0f}s)", flush=True)
    from _common import environment, write_json
    write_json(a.out, dict(benchmark="exact-score sampling error: Gaussian mixture, FD and sliced W1 vs the "
                                     "real-vs-real floor", command=" ".join(["python benchmarks/exact_score.py"] + sys.argv[1:]),
                           pairs=a.pairs, results=rows, environment=environment()))


if __name__ == "__main__":
    main()
