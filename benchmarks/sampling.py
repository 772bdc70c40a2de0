"""Images per second of 1000-step DDPM ancestral sampling: reference vs numba vs PyTorch.

    python benchmarks/sampling.py [--model unet-seed|unet-ddpm] [--batch 64] [--timed-steps 20]
                                  [--rounds 3] [--backends numpy,numba] [--no-torch] [--threads 2]
                                  [--malloc same|default] [--out FILE]
    python benchmarks/sampling.py --check [--timed-steps 2] [--batch 8]   # smoke test, no timing

A full run is 1000 network evaluations plus 1000 ancestral updates (Ho et al. 2020,
Alg. 2, sigma_t^2 = beta_t). Every step costs the same (same shapes), so only
`--timed-steps` steps (the last ones of the chain, t = timed-steps .. 1) are timed, one
implementation after the other (after an untimed warm-up forward each), in `--rounds` rounds
(each round a fresh process per implementation, taken in turn, so that a change in the
machine's load during the run falls on every implementation alike); images/s =
batch / (median step time x 1000): a scaled figure, reported as such (`--timed-steps 1000`
times a whole chain).

Each implementation runs in its own process that holds only its own library, as in
train_step.py (whose worker environments and isolation rule this reuses): refdiff's
backends call the model as the samplers do (refdiff.nn.base.predictor: its inference
forward `predict`, no caches for a backward, fused ops) and `ops.ddpm_step`; PyTorch runs
torch_unet.TorchUNet (TorchUNetDDPM for unet-ddpm, in eval mode: dropout off) under
`torch.no_grad()` with the same update written in torch, from the weights, time
embeddings and step scalars the parent saves (its forward on 8 images must match
refdiff's first). unet-ddpm's weights are its initial ones plus 0.05 N(0, 1) noise from a
fixed seed (model_for), because its zero-initialised last convolutions would make every
block the identity and the output 0: the same cost, but nothing to compare. All start
from the same noise and draw the same z; the JSON records how
far apart their final samples end (float32), the libraries each worker held, the
machine, the commit and the date (default results/sampling_<model>_b<batch>.json).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import train_step  # noqa: E402  (worker environments, malloc settings)

N = 1000    # steps of the chain


def _noise(B, size, timed):
    rng = np.random.default_rng(0)
    x0 = rng.standard_normal((B, 1, size, size)).astype(np.float32)
    zs = rng.standard_normal((timed, B, 1, size, size)).astype(np.float32)
    return x0, zs


def model_for(model_name, backend=None):
    """The benchmarked network: unet-seed as initialised; unet-ddpm's initial weights plus
    0.05 N(0, 1) from seed 0 (see the module docstring)."""
    from refdiff.nn import make_model
    m = make_model(model_name, backend=backend)
    if model_name == "unet-ddpm":
        rng = np.random.default_rng(0)
        m.load_state({k: v + 0.05 * rng.standard_normal(v.shape) for k, v in m.state().items()})
    return m


def _refdiff_chain(name, model_name, x0, zs):
    """The last len(zs) steps of the chain on refdiff backend `name`; -> (seconds per step, final x)."""
    from refdiff.nn.base import predictor
    from refdiff.sde import DDPMSchedule
    from train_step import sync
    sched, B = DDPMSchedule(), x0.shape[0]
    m = model_for(model_name, backend=name)
    net, ops = predictor(m), m.ops                # what the samplers call: the inference forward
    x = ops.asarray(x0)
    net(x, np.full(B, 0.5))                      # warm-up, untimed (numba compiles here)
    times = []
    for k, i in enumerate(range(len(zs) - 1, -1, -1)):   # i = step index, t = (i + 1) / N
        t0 = time.perf_counter()
        eps = net(x, np.full(B, (i + 1) / N))
        z = ops.asarray(zs[k]) if i > 0 else None
        x = ops.ddpm_step(x, eps, z, sched.betas[i], sched.alpha_bars[i], np.sqrt(sched.betas[i]))
        sync(ops)
        times.append(time.perf_counter() - t0)
    return times, ops.to_numpy(x)


def _torch_chain(plan, weights, x0, zs):
    """The same steps in PyTorch, forward only; -> (seconds per step, final x, max |output diff|)."""
    import torch
    from torch_unet import TorchUNet, TorchUNetDDPM
    with np.load(weights) as f:
        state = {k: f[k] for k in f.files if not k.startswith("_")}
        emb, y8, scal = torch.from_numpy(f["_emb"]), f["_y8"], f["_scalars"]
    net, B = (TorchUNetDDPM if "layout" in plan else TorchUNet)(plan, state), x0.shape[0]
    net.eval()                                   # unet-ddpm: dropout off, as refdiff's sampling forward
    x = torch.from_numpy(x0)
    with torch.no_grad():
        k = len(y8)                              # min(8, batch) images, as the parent ran them
        diff = float(np.abs(net(x[:k], emb[-1:].expand(k, -1)).numpy() - y8).max())
        net(x, emb[0:1].expand(B, -1))           # warm-up, untimed
        times = []
        for k, i in enumerate(range(len(zs) - 1, -1, -1)):
            t0 = time.perf_counter()
            coef, inv_sqrt_alpha, sigma = (float(v) for v in scal[k])    # float32 values, as refdiff casts them
            eps = net(x, emb[k:k + 1].expand(B, -1))
            x = (x - coef * eps) * inv_sqrt_alpha
            if i > 0:
                x = x + sigma * torch.from_numpy(zs[k])
            times.append(time.perf_counter() - t0)
    return times, x.numpy(), diff


def _save_for_torch(path, model_name, x0, timed):
    """Weights, per-step time embeddings and step scalars (float32), and refdiff's output on
    8 images at the first timed step, for the torch worker; -> plan. Runs in the parent."""
    from refdiff.nn import functional as F
    from refdiff.nn.steps import ddpm_coeffs
    from refdiff.sde import DDPMSchedule
    from torch_unet import plan_of, plan_of_ddpm
    sched, ref = DDPMSchedule(), model_for(model_name)
    ddpm = model_name == "unet-ddpm"
    steps = list(range(timed - 1, -1, -1))
    ts = np.array([(i + 1) / N for i in steps])
    emb = F.time_embedding(ts * ref.config["time_scale"], ref.config["channels"][0] if ddpm else ref.config["emb_dim"])
    scal = np.array([[*ddpm_coeffs(sched.betas[i], sched.alpha_bars[i], np.float32),
                      np.float32(np.sqrt(sched.betas[i]))] for i in steps], dtype=np.float32)
    k = min(8, len(x0))
    y8 = ref.forward(x0[:k], np.full(k, ts[-1]))
    np.savez(path, _emb=emb, _y8=y8, _scalars=scal, **ref.state())
    return (plan_of_ddpm if ddpm else plan_of)(ref)


def _worker(conn, name, model_name, B, timed, threads, plan, weights):
    """One implementation's timed chain in its own process; sends ("done", result) or an error."""
    try:
        from _common import held_libraries
        size = plan["config"]["image_size"] if plan else 28
        x0, zs = _noise(B, size, timed)
        res = {}
        if name == "torch":
            import torch
            torch.set_num_threads(threads)
            times, final, diff = _torch_chain(plan, weights, x0, zs)
            if diff > 1e-3:
                raise RuntimeError(f"torch network differs from refdiff's by {diff}")
            res.update(torch_vs_refdiff_max_abs_output_diff=diff, torch=torch.__version__)
        else:
            times, final = _refdiff_chain(name, model_name, x0, zs)
        res.update(times=times, final=final, libraries=held_libraries())
        conn.send(("done", res))
    except ImportError as exc:
        conn.send(("skipped", str(exc)))
    except Exception as exc:                     # report, do not hang the parent
        conn.send(("error", repr(exc)))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="unet-seed", choices=("unet-seed", "unet-ddpm"))
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--timed-steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3,
                    help="each worker runs its timed steps once per round, in a fresh process, in turn")
    ap.add_argument("--backends", default="numpy,numba", help="comma-separated refdiff backends, first = baseline")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--threads", type=int, default=2, help="threads of each worker's library (numba, BLAS, torch)")
    ap.add_argument("--check", action="store_true",
                    help="smoke test: run every worker, report the libraries each holds, exit 1 if one holds "
                         "another's; no timing claims; JSON only with --out")
    ap.add_argument("--out", default=None, help="JSON path (default: results/sampling_<model>_b<batch>.json)")
    ap.add_argument("--malloc", default="same", choices=["same", "default"], help=train_step.MALLOC_HELP)
    a = ap.parse_args(argv)
    train_step.MALLOC = a.malloc
    for flag in ("batch", "timed_steps", "threads", "rounds"):
        if not 1 <= getattr(a, flag) <= (N if flag == "timed_steps" else 10 ** 6):
            ap.error(f"--{flag.replace('_', '-')} out of range")
    import importlib.util
    import multiprocessing as mp
    from _common import HERE, environment, write_json
    from train_step import _isolation, one_shot_worker

    names = a.backends.split(",")
    if not a.no_torch:
        names.append("torch")
    ctx, results, notes, plans = mp.get_context("spawn"), {}, {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(1 if a.check else a.rounds):
            for n in names:    # one at a time: a thread pool left spinning must not slow another's steps
                if n in notes:
                    continue
                if n == "torch" and n not in plans:
                    if importlib.util.find_spec("torch") is None:
                        notes[n] = "skipped: No module named 'torch'"
                        continue
                    weights = os.path.join(tmp, "weights.npz")
                    plans[n] = (_save_for_torch(weights, a.model, _noise(a.batch, 28, a.timed_steps)[0],
                                                a.timed_steps), weights)
                plan, weights = plans.get(n, (None, None))
                kind, value = one_shot_worker(ctx, n, a.threads, _worker,
                                              (n, a.model, a.batch, a.timed_steps, a.threads, plan, weights))
                if kind == "skipped":
                    notes[n] = f"skipped: {value}"
                elif kind != "done":
                    raise RuntimeError(f"{n} worker failed: {value}")
                elif n in results:     # a later round: the same chain again in a fresh process
                    results[n]["times"] += value["times"]
                    results[n]["libraries"] = sorted(set(results[n]["libraries"]) | set(value["libraries"]))
                    results[n]["final"] = value["final"]      # every round's worker is checked, the last compared
                else:
                    results[n] = value
    done = list(results)
    libraries = {n: r["libraries"] for n, r in results.items()}
    bad = _isolation(libraries)
    diff = {n: float(np.abs(results[n]["final"] - results[done[0]]["final"]).max()) for n in done}
    for n in done:
        print(f"{n:>8} worker holds {', '.join(libraries[n]) or 'none'}; final x {diff[n]:.2e} from {done[0]}'s")
    out = dict(benchmark=f"DDPM ancestral sampling, {a.model}, float32", batch=a.batch,
               timed_steps=a.timed_steps, rounds=1 if a.check else a.rounds, total_steps=N, scaled=a.timed_steps < N, threads=a.threads,
               worker_libraries=libraries, isolation_violations=bad, max_abs_diff_of_final_x_vs_first=diff,
               notes=notes, malloc=dict(setting=a.malloc, worker_environment=train_step._worker_env("torch", a.threads)),
               environment=environment())
    if "torch" in results:
        out["torch_vs_refdiff_max_abs_output_diff"] = results["torch"]["torch_vs_refdiff_max_abs_output_diff"]
    if a.check:
        out["check"] = True
        print("isolation:", "ok" if not bad else f"VIOLATED {bad}", "(check mode: no timings reported)")
        if a.out:
            write_json(a.out, out)
        return 1 if bad else 0
    step = {n: float(np.median(results[n]["times"])) for n in done}
    ips = {n: a.batch / (s * N) for n, s in step.items()}
    for n in done:
        print(f"{n:>8}: {step[n] * 1e3:8.1f} ms/step  {ips[n]:.3f} images/s (1000 steps, scaled from "
              f"{a.timed_steps})  x{step[done[0]] / step[n]:.1f} vs {done[0]}")
    # the fastest step as well: on a machine shared with other jobs the median moves with their load
    # (steps of one worker measured 0.05 .. 1.9 s in one run), the fastest step far less
    fastest = {n: float(np.min(results[n]["times"])) for n in done}
    out.update(seconds_per_step_median=step, seconds_per_step_min=fastest,
               seconds_per_step_all={n: results[n]["times"] for n in done},
               images_per_second=ips, speedup_vs_first={n: step[done[0]] / step[n] for n in done})
    write_json(a.out or os.path.join(HERE, "results", f"sampling_{a.model}_b{a.batch}.json"), out)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
