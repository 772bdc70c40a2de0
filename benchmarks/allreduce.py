"""Allreduce time against message size, on the ranks of one machine (shared memory), and the
latency-bandwidth model fitted to it.

    mpirun -n 2 --oversubscribe [--allow-run-as-root] python benchmarks/allreduce.py [--repeats 30] [--out FILE]

Each size (float32 messages from 1 KB to the whole unet-seed gradient, 1,335,486 floats =
5.34 MB) is reduced `--repeats` times with refdiff.distributed's call (Allreduce, IN_PLACE,
SUM) after a barrier; a repeat's time is the slowest rank's, the result the median over
repeats. Then, as refdiff.distributed.GradientAllreduce does it per step, the whole
unet-seed gradient: flatten into the buffer, Allreduce, divide, unflatten.

Fitted model (least squares on the relative errors of the medians): t(n) = alpha + n / beta,
n in bytes. This is
what the shared-memory transport of this machine gives under its load of the moment: a
functional measurement, not a claim about MPI or about any network. docs/distributed.md
uses it, and ASSUMED network parameters (stated there), for the speed-up model at 8 and 64
ranks. Rank 0 writes results/allreduce_shm_n<N>.json (machine, commit, date inside).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import HERE, environment, write_json  # noqa: E402

UNET_SEED_PARAMS = 1_335_486          # make_model("unet-seed").num_parameters()
SIZES = [1 << 10, 4 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20, 2 << 20, 4 << 20, UNET_SEED_PARAMS * 4]


# ASSUMED networks for the speed-up model (not measured here): latency alpha, bandwidth beta.
NETWORKS = {"10GbE": dict(alpha_s=30e-6, beta_gb_per_s=1.25), "IB-100G": dict(alpha_s=2e-6, beta_gb_per_s=12.5)}
# The step it divides: unet-seed, batch 128, float32, on one rank. ASSUMED, like the networks: a
# 2-core machine whose numba step takes 0.261 s (the step measured on the machine that ran
# benchmarks/train_step.py is in results/train_step_unet-seed_b128.json, seconds_median.numba).
STEP_S, STEP_BATCH = 0.261, 128


def speedup_model(ranks, nbytes=UNET_SEED_PARAMS * 4, step_s=STEP_S, copy_s=0.0):
    """Synchronous data parallelism at a fixed global batch, each rank a machine like this
    one: compute step_s / N (perfect division of the batch), then a ring Allreduce,
    2 (N - 1) alpha + 2 (N - 1) / N * bytes / beta (Thakur et al. 2005), plus copy_s
    (flatten/unflatten), no overlap. -> {network: speed-up over one rank}."""
    out = {}
    for name, net in NETWORKS.items():
        t_ar = 2 * (ranks - 1) * net["alpha_s"] + 2 * (ranks - 1) / ranks * nbytes / (net["beta_gb_per_s"] * 1e9)
        out[name] = dict(allreduce_s=t_ar, speedup=step_s / (step_s / ranks + t_ar + copy_s))
    return out


def time_allreduce(comm, nbytes, repeats):
    buf = np.ones(nbytes // 4, dtype=np.float32)
    comm.allreduce_sum_(buf)                        # warm-up (connection set-up)
    ts = []
    for _ in range(repeats):
        comm.barrier()
        t0 = time.perf_counter()
        comm.allreduce_sum_(buf)
        ts.append(time.perf_counter() - t0)
    slowest = np.max(np.array(comm.allgather(ts)), axis=0)      # per repeat, the slowest rank
    return float(np.median(slowest)), float(np.min(slowest))


def time_gradient_allreduce(comm, repeats):
    from refdiff.distributed import GradientAllreduce
    from refdiff.nn import make_model

    model = make_model("unet-seed", dtype=np.float32)
    reduce = GradientAllreduce(comm, model)
    reduce(1, comm.size)
    ts = []
    for _ in range(repeats):
        comm.barrier()
        t0 = time.perf_counter()
        reduce(1, comm.size)
        ts.append(time.perf_counter() - t0)
    return float(np.median(np.max(np.array(comm.allgather(ts)), axis=0)))


def main(argv=None):
    from refdiff.distributed import get_comm

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    comm = get_comm()
    if comm.size < 2:
        print("run under mpirun with at least 2 ranks (see the docstring)", file=sys.stderr)
        return 2
    rows = []
    for n in SIZES:
        med, best = time_allreduce(comm, n, a.repeats)
        rows.append(dict(bytes=n, median_s=med, min_s=best, gb_per_s=n / med / 1e9))
    grad_s = time_gradient_allreduce(comm, a.repeats)
    if not comm.is_root:
        return 0
    n, t = np.array([r["bytes"] for r in rows], float), np.array([r["median_s"] for r in rows])
    # least squares on relative errors (rows divided by t): the small sizes fix alpha, the large ones beta
    (alpha, inv_beta), *_ = np.linalg.lstsq(np.stack([np.ones_like(n), n], 1) / t[:, None], np.ones_like(t),
                                            rcond=None)
    for r in rows:
        print(f"{r['bytes']:>9d} B  {r['median_s'] * 1e6:9.1f} us  {r['gb_per_s']:6.2f} GB/s")
    print(f"unet-seed gradient (flatten, Allreduce, divide, unflatten): {grad_s * 1e3:.2f} ms")
    out = a.out or os.path.join(HERE, "results", f"allreduce_shm_n{comm.size}.json")
    write_json(out, dict(
        what="MPI Allreduce(IN_PLACE, SUM) of float32 messages between the ranks of one machine "
             "(shared memory); median over repeats of the slowest rank's time",
        command=f"mpirun -n {comm.size} --oversubscribe python benchmarks/allreduce.py --repeats {a.repeats}",
        ranks=comm.size, repeats=a.repeats, sizes=rows,
        unet_seed_gradient=dict(floats=UNET_SEED_PARAMS, seconds=grad_s,
                                what="refdiff.distributed.GradientAllreduce: flatten, Allreduce, divide, unflatten"),
        fit=dict(model="t = alpha + bytes / beta, least squares on relative errors", alpha_s=float(alpha),
                 beta_gb_per_s=float(1 / inv_beta / 1e9) if inv_beta > 0 else None),
        speedup_model=dict(
            what="unet-seed (the largest model, 1,335,486 parameters: unet-seed and unet share it), global batch "
                 f"{STEP_BATCH}, ASSUMED step {STEP_S} s on one rank (numba, 2 threads), ASSUMED networks {NETWORKS}; "
                 "see speedup_model() for the formula",
            ideal_copy={n: speedup_model(n) for n in (8, 64)},
            with_measured_copy={n: speedup_model(n, copy_s=max(grad_s - rows[-1]["median_s"], 0.0))
                                for n in (8, 64)}),
        caveat="one 2-core machine, its two ranks on its two cores (shared memory); check the load average in "
               "environment before comparing runs",
        environment=environment()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
