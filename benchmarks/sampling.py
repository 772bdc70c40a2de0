"""Images per second of 1000-step DDPM ancestral sampling: reference vs numba.

    python benchmarks/sampling.py [--model unet-seed] [--batch 64] [--timed-steps 20]
                                  [--out benchmarks/results/sampling.json]

A full run is 1000 network evaluations plus 1000 `ddpm_step` updates (Ho et al. 2020,
Alg. 2, sigma_t^2 = beta_t). Every step costs the same (same shapes), so only
`--timed-steps` steps (the last ones of the chain, t = timed-steps .. 1) are timed, one
backend after the other (after an untimed warm-up step each), and images/s =
batch / (median step time x 1000): a scaled figure, reported as such. Both backends start from the same noise and draw the same z; the JSON
records how far apart their samples end (float32).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="unet-seed")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--timed-steps", type=int, default=20)
    ap.add_argument("--backends", default="numpy,numba")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "sampling.json"))
    a = ap.parse_args(argv)
    from _common import environment, write_json
    from train_step import sync
    from refdiff.nn import make_model
    from refdiff.sde import DDPMSchedule

    sched, N = DDPMSchedule(), 1000
    names = a.backends.split(",")
    import refdiff_cuda
    # refdiff_cuda's "numpy" is the reference plus the reference ddpm_step (refdiff.nn has none yet)
    models = {n: make_model(a.model, backend=refdiff_cuda.get_backend(n)) for n in names}
    rng = np.random.default_rng(0)
    size = models[names[0]].config["image_size"]
    x0 = rng.standard_normal((a.batch, 1, size, size)).astype(np.float32)
    zs = rng.standard_normal((a.timed_steps, a.batch, 1, size, size)).astype(np.float32)
    xs = {n: models[n].ops.asarray(x0) for n in names}
    times = {n: [] for n in names}
    for n in names:        # one backend at a time: a thread pool left spinning (OpenBLAS's, libgomp's)
        m, ops = models[n], models[n].ops            # must not slow the other's steps
        m.forward(xs[n], np.full(a.batch, 0.5))      # warm-up, untimed (numba compiles here)
        for k, i in enumerate(range(a.timed_steps - 1, -1, -1)):   # i = step index, t = (i + 1) / N
            t0 = time.perf_counter()
            eps = m.forward(xs[n], np.full(a.batch, (i + 1) / N))
            z = ops.asarray(zs[k]) if i > 0 else None
            xs[n] = ops.ddpm_step(xs[n], eps, z, sched.betas[i], sched.alpha_bars[i], np.sqrt(sched.betas[i]))
            sync(ops)
            times[n].append(time.perf_counter() - t0)
    step = {n: float(np.median(v)) for n, v in times.items()}
    ips = {n: a.batch / (s * N) for n, s in step.items()}
    final = {n: models[n].ops.to_numpy(xs[n]) for n in names}
    diff = {n: float(np.abs(final[n] - final[names[0]]).max()) for n in names}
    for n in names:
        print(f"{n:>8}: {step[n] * 1e3:8.1f} ms/step  {ips[n]:.3f} images/s (1000 steps, scaled from "
              f"{a.timed_steps})  x{step[names[0]] / step[n]:.1f} vs {names[0]}")
    write_json(a.out, dict(benchmark=f"DDPM ancestral sampling, {a.model}, float32", batch=a.batch,
                           timed_steps=a.timed_steps, total_steps=N, scaled=True,
                           seconds_per_step_median=step, seconds_per_step_all=times, images_per_second=ips,
                           speedup_vs_first=dict((n, step[names[0]] / step[n]) for n in names),
                           max_abs_diff_of_final_x_vs_first=diff, environment=environment()))


if __name__ == "__main__":
    main()
