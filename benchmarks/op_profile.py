"""Where one training step's time goes: every op of a backend timed inside a model's step.

    python benchmarks/op_profile.py [--model unet-ddpm] [--batch 64] [--backend numba]
                                    [--versions "{'conv2d': 5}"] [--steps 5] [--clock cpu|wall]
                                    [--predict] [--malloc same|default]

The model is built on a copy of the backend whose op functions are wrapped by a timer (the
model cannot tell: it only calls `ops.<name>`), then takes `--steps` training steps (eps-
prediction MSE, Adam, dropout on where the model has it) after two untimed ones; with
`--predict`, the inference forward the samplers call (model.predict, its fused ops) instead. Printed: the
step time, then each op's share, grouped by kind; a conv is keyed by its kernel, stride,
channels and input size, and its backward by its forward's key. `--clock cpu`
(time.process_time, the default) is this process's CPU time, which on a machine shared with
other jobs moves far less than wall time; it adds up all threads, so run with
NUMBA_NUM_THREADS=1 (OPENBLAS_NUM_THREADS=1 for `--backend numpy`, the reference) for shares
that mean time on one core. Ratios only: this is a profile, not a benchmark (train_step.py
is that). Every backend runs under the benchmarks' glibc malloc settings (`--malloc same`, the
numba backend's own; the process restarts itself with them in its environment), or glibc's
defaults (`--malloc default`).
"""
from __future__ import annotations

import argparse
import ast
import collections
import os
import sys
import time
import types

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))                   # train_step
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # refdiff, uninstalled


def profiled(backend, clock):
    """(ops, totals, counts): a copy of `backend` whose *_forward / *_backward / adam_update
    functions add their time to totals[key] and counts[key]."""
    totals, counts, conv_keys = collections.defaultdict(float), collections.Counter(), {}

    def key_of(name, args, result):
        if name == "conv2d_forward":
            x, w = args[0], args[1]
            stride = args[3] if len(args) > 3 else 1
            k = f"k{w.shape[2]} s{stride} {x.shape[1]}->{w.shape[0]} @{x.shape[2]}"
            conv_keys[id(result[1])] = k
            return "conv2d fwd " + k
        if name in ("conv2d_silu_forward", "group_norm_conv2d_forward"):     # the inference forward's fused ops
            x, w = args[0], args[1 if name == "conv2d_silu_forward" else 4]
            return f"{name[:-8]} k{w.shape[2]} {x.shape[1]}->{w.shape[0]} @{x.shape[2]}"
        if name == "conv2d_backward":
            return "conv2d bwd " + conv_keys.pop(id(args[1]), "?")
        return name.replace("_forward", "").replace("_backward", "")

    def wrap(name, f):
        def timed(*args, **kwargs):
            t0 = clock()
            out = f(*args, **kwargs)
            dt = clock() - t0
            k = key_of(name, args, out)
            totals[k] += dt
            counts[k] += 1
            return out
        return timed

    ops = types.SimpleNamespace(**{k: wrap(k, v) if callable(v) and (k.endswith(("_forward", "_backward"))
                                                                      or k == "adam_update") else v
                                   for k, v in vars(backend).items()})
    return ops, totals, counts


def _malloc_settings(malloc, argv):
    """Run under the benchmarks' malloc settings (train_step._worker_env): glibc reads them from
    the environment when a process starts, so this process starts itself again with them where
    they differ (the reference's backend cannot set them, and page faults would otherwise land
    on whichever op first allocates after memory was given back)."""
    from train_step import _worker_env
    want = _worker_env("numba", 1, malloc)
    want = {k: v for k, v in want.items() if k.startswith("MALLOC_") or k == "REFDIFF_KEEP_MALLOC"}
    if all(os.environ.get(k) == v for k, v in want.items()):
        return
    env = {k: v for k, v in os.environ.items() if k not in want}
    env.update({k: v for k, v in want.items() if v is not None})
    if malloc == "same":
        env.pop("REFDIFF_KEEP_MALLOC", None)
    args = sys.argv[1:] if argv is None else list(argv)
    os.execve(sys.executable, [sys.executable, os.path.abspath(__file__), *args], env)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="unet-ddpm")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--backend", default="numba")
    ap.add_argument("--versions", default=None, help="get_backend's versions, e.g. 1 or \"{'conv2d': 5}\"")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    ap.add_argument("--predict", action="store_true", help="the inference forward (model.predict) instead")
    ap.add_argument("--malloc", default="same", choices=["same", "default"],
                    help="glibc malloc settings, as the benchmarks' --malloc (same: the numba backend's own)")
    a = ap.parse_args(argv)
    if a.batch < 1 or a.steps < 1:
        ap.error("--batch and --steps must be >= 1")
    _malloc_settings(a.malloc, argv)
    from refdiff.backend import get_ops
    clock = time.process_time if a.clock == "cpu" else time.perf_counter
    versions = None if a.versions is None else ast.literal_eval(a.versions)
    if a.backend == "numpy":                   # the reference: no numba in this process
        backend = get_ops(None)
    else:
        import refdiff_cuda
        backend = refdiff_cuda.get_backend(a.backend, versions=versions)
    ops, totals, counts = profiled(backend, clock)
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (a.batch, 1, 28, 28)).astype(np.float32)
    eps = rng.standard_normal((a.batch, 1, 28, 28)).astype(np.float32)
    t = (rng.integers(0, 1000, a.batch) + 1) / 1000.0
    from train_step import refdiff_step        # the benchmark's own step (forward, mse, backward, Adam)
    if a.predict:                              # the inference forward alone: no loss, backward or optimizer
        from refdiff.nn import make_model
        model = make_model(a.model, backend=ops)
        xd = model.ops.asarray(x)

        def step():
            return model.predict(xd, t)
    else:
        _, step = refdiff_step(ops, x, t, eps, a.model)
    for _ in range(2):
        step()
    totals.clear()
    counts.clear()
    t0 = clock()
    for _ in range(a.steps):
        step()
    total = (clock() - t0) / a.steps
    ops_sum = sum(totals.values()) / a.steps
    what = "inference forward (predict)" if a.predict else "step"
    print(f"{a.model} batch {a.batch} on {a.backend} (versions {a.versions or 'newest'}), {a.clock} clock: "
          f"{total * 1e3:.0f} ms per {what}, {ops_sum / total:.0%} of it in ops")
    groups = collections.defaultdict(float)
    for k, v in totals.items():
        groups[" ".join(k.split()[:4]) if k.startswith("conv2d ") else " ".join(k.split()[:2])] += v   # conv2d fwd k3 s1
    print("\nby kind:")
    for k, v in sorted(groups.items(), key=lambda kv: -kv[1]):
        print(f"  {v / a.steps / total:6.1%}  {v / a.steps * 1e3:8.2f} ms  {k}")
    print(f"  {1 - ops_sum / total:6.1%}  {(total - ops_sum) * 1e3:8.2f} ms  (between ops: the model's own NumPy code)")
    print("\nby op:")
    for k, v in sorted(totals.items(), key=lambda kv: -kv[1]):
        print(f"  {v / a.steps / total:6.1%}  {v / a.steps * 1e3:8.2f} ms  x{counts[k] // a.steps:<3d} {k}")


if __name__ == "__main__":
    main()
