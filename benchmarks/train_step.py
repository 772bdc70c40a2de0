"""One DDPM training step (forward, backward, Adam) of unet-seed: reference vs numba vs PyTorch.

    python benchmarks/train_step.py [--batch 128] [--rounds 3] [--block 4] [--threads 2]
                                    [--out benchmarks/results/train_step.json]

Every implementation takes the same step on the same data (eps-prediction MSE, Adam lr
1e-4). Rounds take each implementation in turn for a block of `--block` timed steps after
one untimed step (medians over all blocks), so that the ratios come from one run under the
same machine load, while no implementation's first step pays for the thread pool the
previous one left spinning. The NumPy reference runs in `--ref-rounds` rounds only (slow). PyTorch 2.x CPU is timed when importable, on an
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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--block", type=int, default=4, help="timed steps per implementation per round")
    ap.add_argument("--ref-rounds", type=int, default=2, help="rounds that also time the (slow) reference")
    ap.add_argument("--threads", type=int, default=2, help="threads of numba, NumPy's BLAS and torch alike")
    ap.add_argument("--backends", default="numba", help="comma-separated refdiff_cuda backends besides numpy")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "train_step.json"))
    a = ap.parse_args(argv)
    from _common import environment, gemm_peak_gflops, median_time, set_threads, write_json

    rng = np.random.default_rng(0)
    B = a.batch
    x = rng.uniform(-1, 1, (B, 1, 28, 28)).astype(np.float32)
    t = (rng.integers(0, 1000, B) + 1) / 1000.0
    eps = rng.standard_normal(x.shape).astype(np.float32)

    steps, notes = {}, {}
    import refdiff_cuda  # noqa: F401  (sets numba's threading layer before anything runs)
    set_threads(a.threads)
    for name in a.backends.split(","):
        model, steps[name] = refdiff_step(name, x, t, eps)
        steps[name]()                            # compile / warm up
    ref_model, ref_step = refdiff_step("numpy", x, t, eps)
    if not a.no_torch:
        try:
            steps["torch"], diff = torch_step(ref_model, x, t, eps)
            notes["torch_vs_refdiff_max_abs_output_diff"] = diff
            if diff > 1e-3:
                raise RuntimeError(f"torch network differs from refdiff's by {diff}")
            steps["torch"]()
        except ImportError as exc:
            notes["torch"] = f"skipped: {exc}"
    peak = gemm_peak_gflops()

    steps["numpy"] = ref_step
    times = {k: [] for k in steps}
    for r in range(a.rounds):        # blocks, not single steps, in turn: a thread pool that has just
        for k, f in steps.items():   # run (libgomp's spinning workers, OpenBLAS's) slows the next one's first step
            if r < a.ref_rounds or k != "numpy":
                f()                  # untimed: absorbs the switch from the previous implementation
                times[k] += median_time(f, a.block)[1]
    res = {k: float(np.median(v)) for k, v in times.items()}
    best = {k: float(np.min(v)) for k, v in times.items()}
    gflops = {k: MFLOP_PER_IMAGE * B / 1e3 / v for k, v in res.items()}
    out = dict(benchmark="unet-seed training step (forward + backward + Adam), float32", batch=B,
               threads=a.threads, rounds=a.rounds, block=a.block, ref_rounds=a.ref_rounds, seconds_median=res, seconds_min=best, seconds_all=times,
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
