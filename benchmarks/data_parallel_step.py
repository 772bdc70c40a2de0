"""Training throughput on one machine: 1 rank x T threads against N ranks x (T / N) threads
(refdiff.distributed), and the share of a step each rank spends averaging gradients.

    python benchmarks/data_parallel_step.py [--model unet-seed] [--batch 32] [--steps 4] [--rounds 2]
                                            [--threads 2] [--ranks 2] [--backend numpy] [--out FILE]

Each configuration runs in its own processes (the 1-rank one without mpirun, the N-rank one
under `mpirun -n N --oversubscribe`), with its threads set through NUMBA_NUM_THREADS,
OMP_NUM_THREADS, OPENBLAS_NUM_THREADS and MKL_NUM_THREADS. A worker takes one untimed step,
then `--steps` timed steps of the eps objective (float32) on a fixed random global batch;
it reports the median step time (the slowest rank's) and, with N ranks, the median time
inside GradientAllreduce (copies and Allreduce). Rounds alternate the configurations so that
both see the same machine load. Writes results/data_parallel_<model>_b<batch>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import HERE, environment, write_json  # noqa: E402


def worker(a):
    from refdiff.distributed import DataParallel, get_comm
    from refdiff.nn import make_model
    from refdiff.objectives import EpsObjective

    comm = get_comm()
    model = make_model(a.model, dtype=np.float32, backend=a.backend)
    obj = EpsObjective(model, {})
    dp = DataParallel(comm, obj, model.kind)
    x = np.random.default_rng(0).uniform(-1, 1, (a.batch, 1, 28, 28)).astype(np.float32)
    steps, comm_s = [], []
    for s in range(a.steps + 1):
        rng = np.random.default_rng([0, s])
        before = dp.comm_seconds()
        if comm.size > 1:
            comm.barrier()
        t0 = time.perf_counter()
        idx, local_rng = dp.shard(np.arange(a.batch), rng)
        obj.step(model.ops.asarray(x[idx]), None, local_rng)
        if s:
            steps.append(time.perf_counter() - t0)
            comm_s.append(dp.comm_seconds() - before)
    all_steps = comm.allgather(steps)
    all_comm = comm.allgather(comm_s)
    if comm.is_root:
        step = np.max(np.array(all_steps), axis=0)
        with open(a.worker_out, "w") as f:
            json.dump(dict(step_s=float(np.median(step)), steps_s=step.tolist(),
                           comm_s=float(np.median(np.max(np.array(all_comm), axis=0)))), f)


def run_config(a, ranks, threads):
    env = dict(os.environ, **{k: str(threads) for k in ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS",
                                                        "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")})
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "w.json")
        cmd = [sys.executable, os.path.abspath(__file__), "--worker-out", out, "--model", a.model,
               "--batch", str(a.batch), "--steps", str(a.steps), "--backend", a.backend]
        if ranks > 1:
            cmd = ["mpirun", "-n", str(ranks), "--oversubscribe"] + \
                  (["--allow-run-as-root"] if os.geteuid() == 0 else []) + cmd
        subprocess.run(cmd, check=True, env=env)
        with open(out) as f:
            return json.load(f)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="unet-seed")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=2, help="threads of the 1-rank run; N ranks get threads / N")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--backend", default="numpy")
    p.add_argument("--out", default=None)
    p.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker_out:
        return worker(a)
    configs = {f"1x{a.threads}": (1, a.threads), f"{a.ranks}x{max(a.threads // a.ranks, 1)}":
               (a.ranks, max(a.threads // a.ranks, 1))}
    res = {k: [] for k in configs}
    for _ in range(a.rounds):
        for k, (ranks, threads) in configs.items():
            res[k].append(run_config(a, ranks, threads))
            print(k, res[k][-1]["step_s"], res[k][-1]["comm_s"])
    summary = {k: dict(step_s=float(np.median([r["step_s"] for r in v])),
                       comm_s=float(np.median([r["comm_s"] for r in v])),
                       images_per_s=a.batch / float(np.median([r["step_s"] for r in v]))) for k, v in res.items()}
    for v in summary.values():
        v["comm_share"] = v["comm_s"] / v["step_s"]
    out = a.out or os.path.join(HERE, "results", f"data_parallel_{a.model}_b{a.batch}.json")
    write_json(out, dict(
        what=f"{a.model} eps training step, float32, global batch {a.batch}, backend {a.backend}: "
             f"1 rank x {a.threads} threads vs {a.ranks} ranks (refdiff.distributed); medians of the slowest rank",
        command=f"python benchmarks/data_parallel_step.py --model {a.model} --batch {a.batch} --steps {a.steps} "
                f"--rounds {a.rounds} --threads {a.threads} --ranks {a.ranks} --backend {a.backend}",
        summary=summary, rounds=res,
        caveat="all ranks on one machine; check the load average in environment before comparing runs",
        environment=environment()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
