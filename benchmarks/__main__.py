"""One command for CPU vs GPU: `python -m benchmarks` (from the repository root).

Runs the unet-seed training-step benchmark (train_step.py) and the sampling benchmark
(sampling.py) on every refdiff_cuda backend this machine can run (backend_status(): numpy,
numba, and numba-cuda / cupy where a GPU is present) and on PyTorch where it is installed,
each implementation in its own worker process holding only its own library (the two
scripts' rule). Prints one table, writes results/bench_<batch-train>_<batch-sample>.json
(the two scripts' results, the machine and the commit inside) and a PNG chart beside it:
seconds per training step and images per second per implementation, PyTorch as the
reference line.

    python -m benchmarks [--train-batch 128] [--sample-batch 64] [--quick]

--quick runs the smallest meaningful measurement (batch 8, a few steps): a smoke test of the
whole pipeline, not a result to quote.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def available_backends():
    """refdiff_cuda backends that run here, besides the reference: {name: "ok" | why not}."""
    import refdiff_cuda
    return {k: v for k, v in refdiff_cuda.backend_status().items() if k != "numpy"}


def summarise(train, sample):
    """The two scripts' JSON results -> rows: implementation, s/step, images/s, each vs PyTorch
    (None where PyTorch or the figure is missing)."""
    step = train.get("seconds_median", {})
    ips = sample.get("images_per_second", {})
    rows = []
    for name in dict.fromkeys(list(step) + list(ips)):
        s, i = step.get(name), ips.get(name)
        rows.append(dict(implementation=name, seconds_per_step=s, images_per_second=i,
                         step_speed_vs_torch=(step["torch"] / s) if s and step.get("torch") else None,
                         sampling_speed_vs_torch=(i / ips["torch"]) if i and ips.get("torch") else None))
    return rows


def table(rows):
    def f(v, fmt):
        return "-" if v is None else format(v, fmt)
    lines = [f"{'implementation':<16}{'s / train step':>16}{'vs torch':>10}{'images / s':>14}{'vs torch':>10}"]
    for r in rows:
        lines.append(f"{r['implementation']:<16}{f(r['seconds_per_step'], '.3f'):>16}"
                     f"{f(r['step_speed_vs_torch'], '.2f'):>10}{f(r['images_per_second'], '.3f'):>14}"
                     f"{f(r['sampling_speed_vs_torch'], '.2f'):>10}")
    return "\n".join(lines)


def chart(rows, path, title):
    from refdiff.figures import pyplot, save_figure
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, key, label in ((axes[0], "seconds_per_step", "seconds per training step (lower is better)"),
                           (axes[1], "images_per_second", "images per second, sampling (higher is better)")):
        rr = [r for r in rows if r[key] is not None]
        ax.barh([r["implementation"] for r in rr], [r[key] for r in rr], color="tab:blue")
        torch_value = next((r[key] for r in rr if r["implementation"] == "torch"), None)
        if torch_value is not None:
            ax.axvline(torch_value, color="k", ls="--", lw=1, label="PyTorch")
            ax.legend(fontsize=8)
        ax.set_xlabel(label)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train-batch", type=int, default=128)
    ap.add_argument("--sample-batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2, help="threads of each worker's library")
    ap.add_argument("--quick", action="store_true", help="a smoke test of the pipeline (batch 8, few steps)")
    ap.add_argument("--out", default=None, help="JSON path (default: results/bench_<train>_<sample>.json)")
    ap.add_argument("--malloc", default="same", choices=["same", "default"],
                    help="glibc malloc settings of every worker (train_step.py --malloc)")
    a = ap.parse_args(argv)
    for flag in ("train_batch", "sample_batch", "threads"):
        if getattr(a, flag) < 1:
            ap.error(f"--{flag.replace('_', '-')} must be >= 1")
    if a.quick:
        a.train_batch = a.sample_batch = 8
    status = available_backends()
    backends = [k for k, v in status.items() if v == "ok"]
    for k, why in status.items():
        if why != "ok":
            print(f"skipping {k}: {why}", file=sys.stderr)
    torch = importlib.util.find_spec("torch") is not None        # found, not imported: this process stays clean
    common = ["--threads", str(a.threads), "--malloc", a.malloc] + ([] if torch else ["--no-torch"])
    train_args = ["--batch", str(a.train_batch)] + (["--rounds", "1", "--block", "1", "--ref-rounds", "1"]
                                                    if a.quick else [])
    sample_args = ["--batch", str(a.sample_batch)] + (["--timed-steps", "2", "--rounds", "1"] if a.quick else [])
    from _common import environment, write_json
    with tempfile.TemporaryDirectory() as tmp:
        results = {}
        for name, script, args, backs in (("train_step", "train_step.py", train_args, backends),
                                          ("sampling", "sampling.py", sample_args, ["numpy"] + backends)):
            path = os.path.join(tmp, f"{name}.json")
            cmd = [sys.executable, os.path.join(HERE, script), *args, *common, "--out", path]
            if backs:
                cmd += ["--backends", ",".join(backs)]
            print("$", " ".join(cmd[1:]), flush=True)
            subprocess.run(cmd, check=True)
            with open(path) as f:
                results[name] = json.load(f)
    rows = summarise(results["train_step"], results["sampling"])
    print(table(rows))
    out = a.out or os.path.join(HERE, "results", f"bench_{a.train_batch}_{a.sample_batch}.json")
    write_json(out, dict(benchmark="unet-seed: training step (forward + backward + Adam) and DDPM sampling, float32",
                         quick=a.quick, malloc=a.malloc, backends_skipped={k: v for k, v in status.items() if v != "ok"},
                         summary=rows, train_step=results["train_step"], sampling=results["sampling"],
                         environment=environment()))
    env = results["train_step"].get("environment", {})
    chart(rows, os.path.splitext(out)[0] + ".png",
          f"unet-seed, train batch {a.train_batch}, sample batch {a.sample_batch}, {a.threads} threads; "
          f"{env.get('cpu', '')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
