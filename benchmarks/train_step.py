"""One DDPM training step (forward, backward, Adam) of unet-seed: reference vs numba vs PyTorch.

    python benchmarks/train_step.py [--batch 128] [--rounds 4] [--block 4] [--threads 2]
                                    [--out benchmarks/results/train_step.json]

Every implementation takes the same step on the same data (eps-prediction MSE, Adam lr
1e-4), each in its own worker process (so that no library's thread pool or OpenMP runtime
sits in another's process). Rounds take the workers in turn for a block of `--block` timed
steps after one untimed step (medians over all blocks), so that the ratios come from one
run under the same machine load. The NumPy reference runs in `--ref-rounds` rounds only
(slow). PyTorch 2.x CPU is timed when importable, on an
equivalent network (torch_unet.py) loaded with the same weights and checked to produce
the same output first; skipped otherwise. GFLOP/s use 181 MFLOP per image (forward 30.17 M
multiply-adds, x2 flops, x3 for forward + backward) against the float32 GEMM rate of
NumPy's BLAS measured in the same run.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MFLOP_PER_IMAGE = 181.0


def refdiff_step(backend, x, t, eps):
    from refdiff.nn import make_model
    from refdiff.optim import Adam
    model = make_model("unet-seed", backend=backend)
    opt = Adam(model, lr=1e-4)
    ops = model.ops
    xd, ed = ops.asarray(x), ops.asarray(eps)

    def step():
        model.zero_grad()
        y = model.forward(xd, t)
        loss, cache = ops.mse_forward(y, ed)
        model.backward(ops.mse_backward(cache))
        opt.step()
        sync(ops)
        return loss
    return model, step


def sync(ops):
    """Wait for queued GPU work (CuPy launches are asynchronous) before the clock stops."""
    if getattr(ops.xp, "__name__", "") == "cupy":
        ops.xp.cuda.Device().synchronize()


def torch_step(model_ref, x, t, eps):
    import torch
    from refdiff.nn import functional as F
    from torch_unet import TorchUNet
    net = TorchUNet(model_ref)
    emb = torch.from_numpy(F.time_embedding(t * model_ref.config["time_scale"], model_ref.config["emb_dim"]))
    xt, et = torch.from_numpy(x), torch.from_numpy(eps)
    with torch.no_grad():     # same network? (float32; forward only)
        diff = np.abs(net(xt[:8], emb[:8]).numpy() - model_ref.forward(x[:8], t[:8])).max()
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)

    def step():
        opt.zero_grad()
        loss = ((net(xt, emb) - et) ** 2).sum() / xt.shape[0]
        loss.backward()
        opt.step()
        return float(loss.detach())
    return step, float(diff)


def _data(B):
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (B, 1, 28, 28)).astype(np.float32)
    t = (rng.integers(0, 1000, B) + 1) / 1000.0
    eps = rng.standard_normal(x.shape).astype(np.float32)
    return x, t, eps


def _worker(conn, name, B, threads):
    """One implementation in its own process: build, warm up, then run timed blocks on request.

    A process each, because libraries interfere inside one: with torch imported, numba's
    steps took 0.36-0.42 s instead of 0.31-0.34 s (torch loads a second libgomp)."""
    try:
        from _common import median_time, set_threads
        import refdiff_cuda  # noqa: F401  (sets numba's threading layer before anything runs)
        set_threads(threads)
        x, t, eps = _data(B)
        note = None
        if name == "torch":
            from refdiff.nn import make_model
            step, diff = torch_step(make_model("unet-seed"), x, t, eps)
            note = diff
            if diff > 1e-3:
                raise RuntimeError(f"torch network differs from refdiff's by {diff}")
        else:
            _, step = refdiff_step(name, x, t, eps)
        step()                                   # compile / warm up
        conn.send(("ready", note))
        while True:
            n = conn.recv()
            if n is None:
                return
            step()                               # untimed: absorbs the switch from the previous process
            conn.send(("times", median_time(step, n)[1]))
    except ImportError as exc:
        conn.send(("skipped", str(exc)))
    except Exception as exc:                     # report, do not hang the parent
        conn.send(("error", repr(exc)))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--block", type=int, default=4, help="timed steps per implementation per round")
    ap.add_argument("--ref-rounds", type=int, default=3, help="rounds that also time the (slow) reference")
    ap.add_argument("--threads", type=int, default=2, help="threads of numba, NumPy's BLAS and torch alike")
    ap.add_argument("--backends", default="numba", help="comma-separated refdiff_cuda backends besides numpy")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "train_step.json"))
    a = ap.parse_args(argv)
    import multiprocessing as mp
    from _common import environment, gemm_peak_gflops, set_threads, write_json

    B = a.batch
    names = a.backends.split(",") + ([] if a.no_torch else ["torch"]) + ["numpy"]
    ctx = mp.get_context("spawn")
    workers, notes = {}, {}
    for name in names:                           # one at a time: warm-ups must not overlap
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_worker, args=(child, name, B, a.threads), daemon=True)
        proc.start()
        kind, value = parent.recv()
        if kind == "ready":
            workers[name] = (proc, parent)
            if name == "torch":
                notes["torch_vs_refdiff_max_abs_output_diff"] = value
        elif kind == "skipped":
            notes[name] = f"skipped: {value}"
        else:
            raise RuntimeError(f"{name} worker failed: {value}")
    set_threads(a.threads)
    peak = gemm_peak_gflops()

    times = {k: [] for k in workers}
    for r in range(a.rounds):        # blocks in turn, each in its own process (see _worker)
        for k, (_, conn) in workers.items():
            if r < a.ref_rounds or k != "numpy":
                conn.send(a.block)
                kind, value = conn.recv()
                if kind != "times":
                    raise RuntimeError(f"{k} worker failed: {value}")
                times[k] += value
    for proc, conn in workers.values():
        conn.send(None)
        proc.join(timeout=30)
    res = {k: float(np.median(v)) for k, v in times.items()}
    best = {k: float(np.min(v)) for k, v in times.items()}
    gflops = {k: MFLOP_PER_IMAGE * B / 1e3 / v for k, v in res.items()}
    out = dict(benchmark="unet-seed training step (forward + backward + Adam), float32", batch=B,
               threads=a.threads, rounds=a.rounds, block=a.block, ref_rounds=a.ref_rounds,
               seconds_median=res, seconds_min=best, seconds_all=times,
               gflops=gflops, gemm_peak_gflops_float32=peak,
               fraction_of_peak={k: v / peak for k, v in gflops.items()},
               speedup_vs_reference={k: res["numpy"] / v for k, v in res.items()},
               environment=environment(), notes=notes)
    if "torch" in res:
        out["speed_vs_torch_median"] = {k: res["torch"] / v for k, v in res.items()}
        out["speed_vs_torch_min"] = {k: best["torch"] / v for k, v in best.items()}
    for k in res:
        print(f"{k:>8}: {res[k]:.3f} s/step  {gflops[k]:6.1f} GFLOP/s  ({gflops[k] / peak:.0%} of the {peak:.0f} "
              f"GFLOP/s GEMM peak)  x{res['numpy'] / res[k]:.1f} vs reference")
    write_json(a.out, out)


if __name__ == "__main__":
    main()
