"""Per-layer conv2d timings (forward, backward) of a UNet's shapes: numba versions vs PyTorch.

    python benchmarks/conv_layers.py [--model unet-seed] [--batch 128] [--versions 2,3,5] [--threads 2]
                                     [--rounds 3] [--no-torch] [--out benchmarks/results/conv_layers.json]
    python benchmarks/conv_layers.py --model unet-ddpm --batch 64 --versions 6
                                     (-> benchmarks/results/conv_layers_unet-ddpm.json)

For each (Cin -> Cout, image size) of unet-seed's 3 x 3 convs (stride 1, padding 1) and its
4 x 4 stride-2 downsamples (--model unet-ddpm: its 3 x 3 convs, its 3 x 3 stride-2
downsamples and its 1 x 1 convs: ResBlock skips and attention's qkv; the first, the upsampling
and the output convs included), times the numba backend's conv2d forward and backward per
version (median of 9 after a warm-up; inputs channel-major, as the UNet hands them over)
and torch.nn.functional.conv2d's when torch is importable (its backward timed alone, after
an untimed forward). GFLOP/s count 2 B Cin Cout kH kW Ho Wo per forward.

numba and PyTorch run in processes of their own, each holding only its own library (the
rule and the worker environments of train_step.py), in --rounds rounds of one process each,
in turn; every figure is the fastest round's median (each round's medians are kept in the
JSON: load on a shared machine only ever adds time, and comes in bursts that one round can
take whole). Both draw the same inputs from a per-layer seed. The JSON records which libraries each process held, the
machine, the commit and the date.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SHAPES = {  # model -> [(Cin, Cout, H, k, stride)]; padding 1, or 0 for a 1 x 1 conv (_padding)
    "unet-seed": [
        (1, 10, 28, 3, 1), (10, 10, 28, 3, 1), (20, 10, 28, 3, 1), (10, 1, 28, 3, 1),
        (20, 20, 14, 3, 1), (40, 40, 7, 3, 1), (80, 80, 3, 3, 1), (160, 80, 3, 3, 1),
        (10, 10, 28, 4, 2), (20, 20, 14, 4, 2), (40, 40, 6, 4, 2)],
    "unet-ddpm": [   # channels (32, 64, 64) at 28, 14, 7 (docs/unet-ddpm.md)
        (1, 32, 28, 3, 1), (32, 32, 28, 3, 1), (64, 32, 28, 3, 1), (96, 32, 28, 3, 1), (64, 64, 28, 3, 1),
        (32, 1, 28, 3, 1), (32, 64, 14, 3, 1), (64, 64, 14, 3, 1), (96, 64, 14, 3, 1), (128, 64, 14, 3, 1),
        (64, 64, 7, 3, 1), (128, 64, 7, 3, 1),
        (32, 32, 28, 3, 2), (64, 64, 14, 3, 2),
        (96, 32, 28, 1, 1), (64, 32, 28, 1, 1), (32, 64, 14, 1, 1), (96, 64, 14, 1, 1), (128, 64, 14, 1, 1),
        (64, 64, 7, 1, 1), (128, 64, 7, 1, 1), (64, 192, 7, 1, 1)],
}


def _padding(k):
    return 0 if k == 1 else 1


def _median_ms(f, repeats=9):
    """Median ms of f over `repeats` calls, after an untimed one."""
    from _common import median_time
    f()
    return median_time(f, repeats)[0] * 1e3


def _backward_ms(fwd, dyt, repeats=9):
    """Median ms of PyTorch's backward alone: each timed call backpropagates a forward run
    untimed just before it (forward + backward minus forward, two medians, went negative
    when the machine's load moved between them)."""
    import time
    fwd().backward(dyt)
    ts = []
    for _ in range(repeats):
        y = fwd()
        t0 = time.perf_counter()
        y.backward(dyt)
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts)) * 1e3


def _inputs(shapes, i, B):
    """Layer i's x (channel-major view of (B, Cin, H, H)), w, b and dy, the same in every process."""
    ci, co, H, k, s = shapes[i]
    rng = np.random.default_rng([0, i])
    x = np.ascontiguousarray(rng.standard_normal((ci, B, H, H)).astype(np.float32)).swapaxes(0, 1)
    w = (rng.standard_normal((co, ci, k, k)) / np.sqrt(ci * k * k)).astype(np.float32)
    ho = (H + 2 * _padding(k) - k) // s + 1
    dy = np.ascontiguousarray(rng.standard_normal((co, B, ho, ho)).astype(np.float32)).swapaxes(0, 1)
    return x, w, np.zeros(co, np.float32), dy


def _numba_times(shapes, B, versions, threads):
    import numba
    import refdiff_cuda
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    rows = []
    for i, (ci, co, H, k, s) in enumerate(shapes):
        x, w, b, dy = _inputs(shapes, i, B)
        p = _padding(k)
        row = {}
        for v in versions:
            be = refdiff_cuda.get_backend("numba", versions={"conv2d": v})
            _, cache = be.conv2d_forward(x, w, b, s, p)
            row[f"numba_v{v}_ms"] = dict(forward=_median_ms(lambda: be.conv2d_forward(x, w, b, s, p)),
                                         backward=_median_ms(lambda: be.conv2d_backward(dy, cache)))
        rows.append(row)
    return rows


def _torch_times(shapes, B, threads):
    import torch
    torch.set_num_threads(threads)
    rows = []
    for i, (ci, co, H, k, s) in enumerate(shapes):
        x, w, b, dy = _inputs(shapes, i, B)
        p = _padding(k)
        xt = torch.from_numpy(np.ascontiguousarray(x)).requires_grad_(True)
        wt, bt = torch.from_numpy(w).requires_grad_(True), torch.from_numpy(b).requires_grad_(True)
        dyt = torch.from_numpy(np.ascontiguousarray(dy))
        fwd = lambda: torch.nn.functional.conv2d(xt, wt, bt, s, p)   # noqa: E731
        rows.append({"torch_ms": dict(forward=_median_ms(fwd), backward=_backward_ms(fwd, dyt))})
    return rows


def _worker(conn, name, shapes, B, versions, threads):
    try:
        from _common import held_libraries
        rows = _torch_times(shapes, B, threads) if name == "torch" else _numba_times(shapes, B, versions, threads)
        conn.send(("done", (rows, held_libraries())))
    except ImportError as exc:
        conn.send(("skipped", str(exc)))
    except Exception as exc:                     # report, do not hang the parent
        conn.send(("error", repr(exc)))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=sorted(SHAPES), default="unet-seed")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--versions", default="2,3,5")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of one numba and one PyTorch process each, "
                                                           "in turn; each figure is the fastest round's median")
    ap.add_argument("--out", default=None, help="default: results/conv_layers.json (unet-seed), "
                                                  "results/conv_layers_<model>.json (other models)")
    a = ap.parse_args(argv)
    for flag in ("batch", "threads", "rounds"):
        if getattr(a, flag) < 1:
            ap.error(f"--{flag} must be >= 1; got {getattr(a, flag)}")
    try:
        versions = [int(v) for v in a.versions.split(",")]
    except ValueError:
        ap.error(f"--versions must be comma-separated integers; got {a.versions!r}")
    shapes = SHAPES[a.model]
    if a.out is None:
        a.out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                             "conv_layers.json" if a.model == "unet-seed" else f"conv_layers_{a.model}.json")
    import multiprocessing as mp
    from _common import environment, write_json
    from train_step import _isolation, one_shot_worker
    B, ctx = a.batch, mp.get_context("spawn")
    rows = [dict(cin=ci, cout=co, size=H, kernel=k, stride=s,
                 forward_gflop=2 * B * ci * co * k * k * ((H + 2 * _padding(k) - k) // s + 1) ** 2 / 1e9)
            for ci, co, H, k, s in shapes]
    libraries, notes, rounds = {}, {}, []
    for _ in range(a.rounds):          # in turn, so that a burst of load on the machine hits one round
        this = {}
        for name in ["numba"] + ([] if a.no_torch else ["torch"]):
            if name in notes:
                continue
            kind, value = one_shot_worker(ctx, name, a.threads, _worker, (name, shapes, B, versions, a.threads))
            if kind == "skipped":
                notes[name] = f"skipped: {value}"
                continue
            if kind != "done":
                if "has versions" in str(value):        # the backend's own message: which versions exist
                    ap.error(f"--versions {a.versions}: {value}")
                raise RuntimeError(f"{name} worker failed: {value}")
            this[name], held = value
            libraries[name] = sorted(set(libraries.get(name, [])) | set(held))
        rounds.append(this)
    for i, row in enumerate(rows):
        for this in rounds:
            for times in this.values():
                for key, val in times[i].items():
                    best = row.setdefault(key, {"forward": np.inf, "backward": np.inf, "rounds": []})
                    best["rounds"].append(val)
                    best["forward"] = min(best["forward"], val["forward"])
                    best["backward"] = min(best["backward"], val["backward"])
        for key, val in row.items():
            if key.endswith("_ms"):
                val["forward_gflops"] = row["forward_gflop"] / val["forward"] * 1e3
    for row in rows:
        print(f"{row['cin']:4d}->{row['cout']:3d} {row['size']:2d}x{row['size']:<2d} k{row['kernel']} s{row['stride']}: "
              + "  ".join(f"{key.replace('_ms', '')} {val['forward']:.2f}/{val['backward']:.2f} ms "
                          f"({val['forward_gflops']:.0f} GFLOP/s)"
                          for key, val in row.items() if key.endswith("_ms")))
    bad = _isolation(libraries)
    write_json(a.out, dict(benchmark=f"{a.model} conv2d layers, forward/backward ms, float32", model=a.model, batch=B,
                           threads=a.threads, rounds=a.rounds, layers=rows, worker_libraries=libraries,
                           isolation_violations=bad, notes=notes, environment=environment()))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
