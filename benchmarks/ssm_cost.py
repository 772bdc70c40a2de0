"""What sliced score matching costs: seconds per training step of DSM, SSM, SSM-VR and SSM-FD.

One training step = zero_grad + loss (forward and backward) + Adam step, on the same model
and the same batch for every loss. The MLP (widths 128, 128, as the ring) is timed at data
dimension D in {2, 16, 64, 256, 784}, and unet-small on 28 x 28 images. The median of
`--reps` steps (the losses taking turns) after one warm-up step is reported, wall and CPU
time, with its ratio to DSM's step. BLAS runs on one thread (set below).

What to expect: exact SSM runs the primal and the tangent pass forward and both backward,
plus second-derivative terms (~2-3x DSM); SSM-FD runs the plain model on 2B rows (~2x);
neither grows with D beyond what DSM does, since one probe replaces D tangent passes.

    PYTHONPATH=. python benchmarks/ssm_cost.py [--out benchmarks/results/ssm_cost.json] [--reps 30]
    PYTHONPATH=. python benchmarks/ssm_cost.py --reps 1 --dims 2 --batch 8 --unet-batch 2 --out /tmp/ssm_cost.json
                                                                                    (a quick check that it runs)
"""
from __future__ import annotations

import os

# One BLAS thread: on a shared 2-core machine, multithreaded BLAS spins and turns load from
# other processes into noise; the ratios between losses are what this measures.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from refdiff import losses  # noqa: E402
from refdiff.nn import make_model  # noqa: E402
from refdiff.optim import Adam  # noqa: E402
from refdiff.sde import VP  # noqa: E402

LOSS_NAMES = ["dsm", "ssm", "ssm-vr", "ssm-fd"]


def bench(label, build, x0, reps, seed=0):
    """Median (wall, CPU) seconds of one training step per loss. The losses take turns, one
    step each per round after a warm-up round, so that load changes on a shared machine hit
    all of them alike."""
    sde = VP()
    runs = {n: (build(), np.random.default_rng(seed)) for n in LOSS_NAMES}
    opts = {n: Adam(runs[n][0], lr=1e-4) for n in LOSS_NAMES}
    wall, cpu = {n: [] for n in LOSS_NAMES}, {n: [] for n in LOSS_NAMES}
    for k in range(reps + 1):
        for name in LOSS_NAMES:
            model, rng = runs[name]
            t0, c0 = time.perf_counter(), time.process_time()
            model.zero_grad()
            losses.LOSSES[name](model, sde, x0, rng)
            opts[name].step()
            if k:
                wall[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
    row = {"wall_s": {n: float(np.median(wall[n])) for n in LOSS_NAMES},
           "cpu_s": {n: float(np.median(cpu[n])) for n in LOSS_NAMES}}
    for kind in ("wall", "cpu"):
        row[kind + "_ratio_to_dsm"] = {n: row[kind + "_s"][n] / row[kind + "_s"]["dsm"] for n in LOSS_NAMES}
    print(f"{label:>16}: wall " + "  ".join(f"{n} {row['wall_s'][n] * 1e3:7.1f} ms" for n in LOSS_NAMES)
          + "   x DSM: " + " ".join(f"{row['wall_ratio_to_dsm'][n]:.2f}" for n in LOSS_NAMES[1:])
          + "   (cpu x DSM: " + " ".join(f"{row['cpu_ratio_to_dsm'][n]:.2f}" for n in LOSS_NAMES[1:]) + ")",
          flush=True)
    return row


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "ssm_cost.json"))
    p.add_argument("--reps", type=int, default=30, help="MLP steps per loss (the UNet gets a third)")
    p.add_argument("--batch", type=int, default=256, help="MLP batch")
    p.add_argument("--unet-batch", type=int, default=8)
    p.add_argument("--dims", default="2,16,64,256,784")
    args = p.parse_args()
    rng = np.random.default_rng(0)
    t_start = time.perf_counter()
    out = {"command": "python benchmarks/ssm_cost.py " + " ".join(sys.argv[1:]),
           "what": "median wall and CPU seconds per training step (zero_grad + loss forward/backward + Adam), "
                   "float32, numpy reference backend; *_ratio_to_dsm = step / DSM step",
           "reps": args.reps, "host": platform.processor() or platform.machine(),
           "cpu_count": os.cpu_count(), "blas_threads": os.environ["OPENBLAS_NUM_THREADS"], "load_average_at_start": os.getloadavg(), "mlp": {}, "unet-small": None}
    for D in (int(d) for d in args.dims.split(",")):
        x0 = rng.standard_normal((args.batch, D))
        build = lambda: make_model("mlp", dim=D, widths=(128, 128), seed=0)
        out["mlp"][str(D)] = dict(batch=args.batch, **bench(f"mlp D={D}", build, x0, args.reps))
    x0 = rng.uniform(-1, 1, (args.unet_batch, 1, 28, 28))
    build = lambda: make_model("unet-small", seed=0)     # UNet carries forward_jvp / backward_jvp
    out["unet-small"] = dict(batch=args.unet_batch, image="1x28x28",
                             **bench("unet-small 28x28", build, x0, max(1, args.reps // 3)))
    out["seconds_total"] = time.perf_counter() - t_start
    out["load_average_at_end"] = os.getloadavg()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    tmp = f"{args.out}.{os.getpid()}.tmp"          # written whole, then renamed: never half a file
    with open(tmp, "w") as f:
        json.dump(out, f, indent=2)
    os.replace(tmp, args.out)
    print(f"total {out['seconds_total']:.0f} s -> {args.out}")


if __name__ == "__main__":
    main()
