"""One DDPM training step (forward, backward, Adam) of unet-seed or unet-ddpm: reference vs numba
vs PyTorch.

    python benchmarks/train_step.py [--model unet-seed] [--batch 128] [--rounds 4] [--block 4]
                                    [--threads 2] [--backends numba] [--no-torch] [--out FILE]
    python benchmarks/train_step.py --model unet-ddpm               # batch 64 by default
    python benchmarks/train_step.py --check [--steps 1] [--batch 8]     # smoke test, no timing

Every implementation takes the same step on the same data (eps-prediction MSE, Adam lr
1e-4), each in its own worker process that holds only its own library, because libraries
slow each other inside one process (torch's libgomp slows numba's steps; numba,
threadpoolctl and a second OpenMP runtime slow torch's):

    numpy   the reference: imports refdiff (NumPy) only; BLAS threads from
            OPENBLAS_NUM_THREADS / OMP_NUM_THREADS / MKL_NUM_THREADS set for its process
    numba   (and any other refdiff_cuda backend): refdiff_cuda and numba, never torch;
            NUMBA_NUM_THREADS set for its process
    torch   torch, numpy and torch_unet.py only, never refdiff, numba or threadpoolctl;
            torch.set_num_threads. It builds the same network (torch_unet.TorchUNet or
            TorchUNetDDPM) from the plan and weights that the parent saves to a temporary .npz,
            and its output on 8 images must match refdiff's before anything is timed (skipped
            without torch). unet-ddpm is first checked in float64: output, input gradient and
            every parameter gradient of the network (dropout off, every weight perturbed so that
            no zero-initialised layer hides a branch) against refdiff's, worst difference
            relative to the tensor's largest entry <= CHECK64_RTOL; then timed in float32.
            Its training step runs dropout (p from the config) in both: refdiff draws its masks
            from a numpy Generator, torch from its own generator.

Each worker reports which of torch, numba, refdiff_cuda and threadpoolctl it holds
(`worker_libraries` in the JSON, read from its own sys.modules after its last step);
`--check` builds every worker, takes `--steps` steps in each, prints that report and the
first step's loss per worker (all start from the same weights and data, so they agree to
float32 rounding), and exits 1 if a worker holds a library that is not its own or a
first loss differs from the reference's by more than 1e-4 relative.

Rounds take the workers in turn for a block of `--block` timed steps after one untimed
step (medians over all blocks), so that the ratios come from one run under the same
machine load. The reference runs in `--ref-rounds` rounds only (slow). GFLOP/s use 181
MFLOP per image (forward 30.17 M multiply-adds, x2 flops, x3 for forward + backward)
against the float32 GEMM rate of NumPy's BLAS measured by the reference's worker in the
same run; unet-ddpm's count (flops_per_image: convolutions, attention products and linear
layers of one forward, counted on the reference by wrapping its ops) is 2 x 3 x its
multiply-adds. The JSON (default results/train_step_<model>_b<batch>.json) records the
machine, the commit and the date.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MFLOP_PER_IMAGE = 181.0           # unet-seed's (see the module docstring)
MODEL = "unet-seed"
MODELS = ("unet-seed", "unet-ddpm")
DEFAULT_BATCH = {"unet-seed": 128, "unet-ddpm": 64}
LOSS_RTOL = 1e-4
# float64 agreement of TorchUNetDDPM with refdiff: the same sums in another order, about 1e3
# terms each, u = 1.1e-16, through ~30 layers: measured 1.2e-14; any wrong index or term is O(1).
CHECK64_RTOL = 1e-10
# Libraries each worker must not hold (see the module docstring); refdiff_cuda's backends
# may hold numba, refdiff_cuda and threadpoolctl (the backend pins scipy's BLAS with it).
FORBIDDEN = {"numpy": {"torch", "numba", "refdiff_cuda", "threadpoolctl"},
             "torch": {"numba", "refdiff_cuda", "threadpoolctl"}}
FORBIDDEN_FOR_BACKENDS = {"torch"}


def refdiff_step(backend, x, t, eps, model_name=MODEL):
    """A refdiff training step of `model_name` on `backend` ("numpy" is the reference); models
    with dropout run it, masks from one Generator."""
    from refdiff.nn import make_model
    from refdiff.optim import Adam
    model = make_model(model_name, backend=backend)
    opt = Adam(model, lr=1e-4)
    ops = model.ops
    xd, ed = ops.asarray(x), ops.asarray(eps)
    drop = {"rng": np.random.default_rng(1)} if getattr(model, "uses_dropout", False) else {}

    def step():
        model.zero_grad()
        y = model.forward(xd, t, **drop)
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


def torch_step(plan, weights, x, eps):
    """The same step in PyTorch, from `weights` (.npz: the parameters, `_emb` the time
    embedding of the batch, `_y8` refdiff's output on x[:8]; for unet-ddpm also the float64
    check, check64). -> (step, max |output diff|, {float64 check: worst relative diff})."""
    import torch
    from torch_unet import TorchUNet, TorchUNetDDPM
    with np.load(weights) as f:
        state = {k: f[k] for k in f.files if not k.startswith("_")}
        emb, y8 = torch.from_numpy(f["_emb"]), f["_y8"]
    ddpm = "layout" in plan
    net = TorchUNetDDPM(plan, state) if ddpm else TorchUNet(plan, state)
    check = check64(net, weights) if ddpm else {}
    xt, et = torch.from_numpy(x), torch.from_numpy(eps)
    net.eval()
    with torch.no_grad():     # same network? (float32; forward only)
        diff = float(np.abs(net(xt[:8], emb[:8]).numpy() - y8).max())
    net.train()
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)

    def step():
        opt.zero_grad()
        loss = ((net(xt, emb) - et) ** 2).sum() / xt.shape[0]    # = refdiff's mse_forward
        loss.backward()
        opt.step()
        return float(loss.detach())
    return step, diff, check


def check64(net, weights):
    """TorchUNetDDPM vs refdiff in float64 (see the module docstring): -> {tensor: worst
    |torch - refdiff| / max |refdiff|}; RuntimeError past CHECK64_RTOL. Leaves net in float32
    with the training weights loaded back."""
    import torch
    with np.load(weights) as f:
        c = {k[len("_c64_"):]: f[k] for k in f.files if k.startswith("_c64_")}
        state = {k: f[k] for k in f.files if not k.startswith("_")}
    net.load({k[len("param."):]: v for k, v in c.items() if k.startswith("param.")}, torch.float64)
    net.eval()
    x = torch.from_numpy(c["x"]).requires_grad_(True)
    y = net(x, torch.from_numpy(c["emb"]))
    (y * torch.from_numpy(c["dy"])).sum().backward()
    rel = lambda a, r: float(np.abs(a - r).max() / max(np.abs(r).max(), 1e-300))
    out = {"output": rel(y.detach().numpy(), c["y"]), "dx": rel(x.grad.numpy(), c["dx"])}
    for n, p in net.named_parameters():
        k = n[len("mods."):].replace("__", ".")
        out[k] = rel(p.grad.numpy(), c["grad." + k])
    worst = max(out, key=out.get)
    if out[worst] > CHECK64_RTOL:
        raise RuntimeError(f"TorchUNetDDPM differs from refdiff in float64: {worst} off by {out[worst]:.3g} "
                           f"(relative to its largest entry) > {CHECK64_RTOL}")
    net.zero_grad(set_to_none=True)
    net.load(state, torch.float32)
    return out


def _data(B):
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (B, 1, 28, 28)).astype(np.float32)
    t = (rng.integers(0, 1000, B) + 1) / 1000.0
    eps = rng.standard_normal(x.shape).astype(np.float32)
    return x, t, eps


# glibc's malloc settings of every worker (--malloc): "same" gives every process the values the
# numba backend sets itself (refdiff_cuda.numba_cpu.MALLOC_SETTINGS, through glibc's environment
# variables, read at the process's start), so that no worker pays page faults the others do not
# (PyTorch's no_grad forward of unet-seed at batch 64 took ~7,000 per call with glibc's defaults);
# "default" leaves glibc's defaults in every worker, numba's included (REFDIFF_KEEP_MALLOC=1).
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(1 << 30)}
MALLOC = "same"
MALLOC_HELP = ("glibc malloc settings of every worker: 'same' = the numba backend's own (MALLOC_ENV), "
               "'default' = glibc's defaults everywhere")


def _worker_env(name, threads, malloc=None):
    """Environment variables for a worker's process: each library's own thread setting, and
    glibc's malloc settings (MALLOC, or `malloc`: "same" or "default"); a value None unsets."""
    n = str(threads)
    malloc = MALLOC if malloc is None else malloc
    if malloc == "same":
        mem = dict(MALLOC_ENV)
    else:          # glibc's defaults: none of its variables inherited from the caller, numba's own settings off
        mem = dict({k: None for k in MALLOC_ENV}, **({} if name in ("numpy", "torch") else {"REFDIFF_KEEP_MALLOC": "1"}))
    if name == "numpy":
        return dict(OPENBLAS_NUM_THREADS=n, OMP_NUM_THREADS=n, MKL_NUM_THREADS=n, **mem)
    if name == "torch":
        return mem                               # torch.set_num_threads inside the worker
    return dict(NUMBA_NUM_THREADS=n, OPENBLAS_NUM_THREADS=n, **mem)


@contextlib.contextmanager
def _environ(extra):
    """os.environ with `extra` set (a value None: unset), restored on exit (a spawned process
    inherits it at start)."""
    old = {k: os.environ.get(k) for k in extra}
    for k, v in extra.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def one_shot_worker(ctx, name, threads, target, args):
    """Run `target(conn, *args)` in a process of its own with worker `name`'s thread settings
    and wait for its one answer (kind, value) on the pipe."""
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=target, args=(child, *args), daemon=True)
    with _environ(_worker_env(name, threads)):
        proc.start()
    kind, value = parent.recv()
    proc.join(timeout=30)
    return kind, value


def _worker(conn, name, B, threads, plan, weights, model_name=MODEL):
    """One implementation in its own process: build, one untimed step, then serve requests:
    an int n (one untimed step, then n timed ones), "peak" (the reference's worker: NumPy's
    float32 GEMM rate) or None (report the libraries held, and stop)."""
    try:
        from _common import gemm_peak_gflops, held_libraries, median_time
        x, t, eps = _data(B)
        info = {}
        if name == "torch":
            import torch
            torch.set_num_threads(threads)
            step, diff, check = torch_step(plan, weights, x, eps)
            info.update(torch_vs_refdiff_max_abs_output_diff=diff, torch=torch.__version__,
                        torch_threads=torch.get_num_threads())
            if check:
                info["torch_vs_refdiff_float64_worst_rel_diff"] = max(check.values())
                info["torch_vs_refdiff_float64_tensors_checked"] = len(check)
            if diff > 1e-3:
                raise RuntimeError(f"torch network differs from refdiff's by {diff}")
        else:
            _, step = refdiff_step(name, x, t, eps, model_name)
        info["first_loss"] = float(step())       # compile / warm up; same weights and data everywhere
        if "numba" in sys.modules:
            numba = sys.modules["numba"]
            info.update(numba=numba.__version__, numba_threads=numba.get_num_threads())
            with contextlib.suppress(ValueError):
                info["numba_threading_layer"] = numba.threading_layer()
        conn.send(("ready", info))
        while True:
            n = conn.recv()
            if n is None:
                conn.send(("libraries", held_libraries()))
                return
            if n == "peak":
                conn.send(("peak", gemm_peak_gflops()))
                continue
            step()                               # untimed: absorbs the switch from the previous process
            conn.send(("times", median_time(step, n)[1]))
    except ImportError as exc:
        conn.send(("skipped", str(exc)))
    except Exception as exc:                     # report, do not hang the parent
        conn.send(("error", repr(exc)))


def _weights_for_torch(tmp, B, model_name=MODEL):
    """Save the reference's weights, the batch's time embedding and refdiff's output on 8
    images for the torch worker (for unet-ddpm also the float64 check's inputs and refdiff's
    results, `_c64_*`); -> (plan, path). Runs in the parent (NumPy only)."""
    from refdiff.nn import functional as F
    from refdiff.nn import make_model
    from torch_unet import plan_of, plan_of_ddpm
    ref = make_model(model_name)
    x, t, _ = _data(B)
    ddpm = model_name == "unet-ddpm"
    emb = F.time_embedding(t * ref.config["time_scale"], ref.config["channels"][0] if ddpm else ref.config["emb_dim"])
    extra = _float64_check(model_name, ref.state()) if ddpm else {}
    path = os.path.join(tmp, "weights.npz")
    np.savez(path, _emb=emb, _y8=ref.forward(x[:8], t[:8]), **ref.state(), **extra)
    return (plan_of_ddpm if ddpm else plan_of)(ref), path


def _float64_check(model_name, state, B=3):
    """refdiff's float64 output, dx and parameter gradients of `model_name` with every weight
    perturbed (the zero-initialised convs too), dropout off, for a random dy: {"_c64_...": array}."""
    from refdiff.nn import functional as F
    from refdiff.nn import make_model
    rng = np.random.default_rng(3)
    m = make_model(model_name, dtype=np.float64)
    params = {k: v + 0.05 * rng.standard_normal(v.shape) for k, v in state.items()}
    m.load_state(params)
    x, t = rng.standard_normal((B, 1, 28, 28)), rng.uniform(0.01, 1.0, B)
    y = m.forward(x, t)
    dy = rng.standard_normal(y.shape)
    m.zero_grad()
    dx = m.backward(dy)
    emb = F.time_embedding(t * m.config["time_scale"], m.config["channels"][0], dtype=np.float64)
    out = dict(x=x, emb=emb, y=y, dy=dy, dx=dx, **{"param." + k: v for k, v in params.items()},
               **{"grad." + k: np.asarray(g) for k, g in m.grads.items()})
    return {"_c64_" + k: v for k, v in out.items()}


def flops_per_image(model_name):
    """Multiply-adds of one forward of `model_name` on one 28 x 28 image, counted on the
    reference (convolutions, transposed convolutions, attention's two products, linear
    layers; elementwise ops not counted) -> 2 x 3 x that in MFLOP (forward + backward)."""
    import types
    from refdiff.backend import REFERENCE
    from refdiff.nn import make_model
    macs = [0]

    def counting(name, count):
        f = getattr(REFERENCE, name)

        def g(*a, **k):
            y, cache = f(*a, **k)
            macs[0] += count(a, y)
            return y, cache
        return g
    conv = lambda a, y: y.shape[0] * int(np.prod(y.shape[2:])) * int(np.prod(a[1].shape))
    convt = lambda a, y: a[0].shape[0] * int(np.prod(a[0].shape[2:])) * int(np.prod(a[1].shape))
    attn = lambda a, y: 2 * y.shape[0] * y.shape[1] * int(np.prod(y.shape[2:])) ** 2
    lin = lambda a, y: y.size * a[1].shape[1]
    ops = types.SimpleNamespace(**vars(REFERENCE))
    for name, count in (("conv2d_forward", conv), ("conv_transpose2d_forward", convt),
                        ("spatial_attention_forward", attn), ("linear_forward", lin)):
        if hasattr(REFERENCE, name):
            setattr(ops, name, counting(name, count))
    m = make_model(model_name, backend=ops)
    m.forward(np.zeros((1, 1, 28, 28), np.float32), np.array([0.5]))
    return 6 * macs[0] / 1e6


def _start_workers(names, B, threads, tmp, model_name=MODEL):
    """Start the workers one at a time (warm-ups must not overlap); -> ({name: (proc, conn)},
    {name: info}, notes)."""
    import multiprocessing as mp
    ctx = mp.get_context("spawn")
    workers, infos, notes = {}, {}, {}
    for name in names:
        plan = weights = None
        if name == "torch":
            try:
                import importlib.util
                if importlib.util.find_spec("torch") is None:
                    raise ImportError("No module named 'torch'")
                plan, weights = _weights_for_torch(tmp, B, model_name)
            except ImportError as exc:
                notes[name] = f"skipped: {exc}"
                continue
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_worker, args=(child, name, B, threads, plan, weights, model_name), daemon=True)
        with _environ(_worker_env(name, threads)):
            proc.start()
        kind, value = parent.recv()
        if kind == "ready":
            workers[name], infos[name] = (proc, parent), value
        elif kind == "skipped":
            notes[name] = f"skipped: {value}"
        else:
            raise RuntimeError(f"{name} worker failed: {value}")
    return workers, infos, notes


def _ask(conn, name, request, expect):
    conn.send(request)
    kind, value = conn.recv()
    if kind != expect:
        raise RuntimeError(f"{name} worker failed: {value}")
    return value


def _isolation(libraries):
    """{worker: [libraries it must not hold but does]} for the workers that break the rule."""
    bad = {}
    for name, held in libraries.items():
        extra = sorted(set(held) & FORBIDDEN.get(name, FORBIDDEN_FOR_BACKENDS))
        if extra:
            bad[name] = extra
    return bad


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=MODEL, choices=MODELS)
    ap.add_argument("--batch", type=int, default=None, help="default: 128 for unet-seed, 64 for unet-ddpm")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--block", type=int, default=4, help="timed steps per implementation per round")
    ap.add_argument("--ref-rounds", type=int, default=3, help="rounds that also time the (slow) reference")
    ap.add_argument("--threads", type=int, default=2, help="threads of each worker's library (numba, BLAS, torch)")
    ap.add_argument("--backends", default="numba", help="comma-separated refdiff_cuda backends besides numpy")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--check", action="store_true",
                    help="smoke test: build every worker, take --steps steps, report the libraries each "
                         "holds and exit 1 if one holds another's; no timing claims; JSON only with --out")
    ap.add_argument("--steps", type=int, default=1, help="steps per worker with --check")
    ap.add_argument("--out", default=None, help="JSON path (default: results/train_step_<model>_b<batch>.json)")
    ap.add_argument("--malloc", default="same", choices=["same", "default"], help=MALLOC_HELP)
    a = ap.parse_args(argv)
    global MALLOC
    MALLOC = a.malloc
    if a.batch is None:
        a.batch = DEFAULT_BATCH[a.model]
    for flag in ("batch", "rounds", "block", "threads", "steps"):
        if getattr(a, flag) < 1:
            ap.error(f"--{flag} must be >= 1")
    if a.check:
        a.rounds, a.block, a.ref_rounds = 1, a.steps, 1
    from _common import HERE, environment, write_json

    B = a.batch
    names = [b for b in a.backends.split(",") if b] + ([] if a.no_torch else ["torch"]) + ["numpy"]
    with tempfile.TemporaryDirectory() as tmp:
        workers, infos, notes = _start_workers(names, B, a.threads, tmp, a.model)
        peak = None if a.check else _ask(workers["numpy"][1], "numpy", "peak", "peak")
        times = {k: [] for k in workers}
        for r in range(a.rounds):        # blocks in turn, each in its own process (see _worker)
            for k, (_, conn) in workers.items():
                if r < a.ref_rounds or k != "numpy":
                    times[k] += _ask(conn, k, a.block, "times")
        libraries = {k: _ask(conn, k, None, "libraries") for k, (_, conn) in workers.items()}
        for proc, _ in workers.values():
            proc.join(timeout=30)
    bad = _isolation(libraries)
    losses = {k: v["first_loss"] for k, v in infos.items()}
    # Same weights, data and step everywhere: the first losses agree to float32 rounding of a
    # sum over B x 784 terms taken in another order (check_op's float32 rtol, 1e-4).
    loss_rel = {k: abs(v - losses["numpy"]) / abs(losses["numpy"]) for k, v in losses.items()}
    if max(loss_rel.values()) > LOSS_RTOL:
        bad["first_loss"] = {k: v for k, v in loss_rel.items() if v > LOSS_RTOL}
    if "torch_vs_refdiff_float64_worst_rel_diff" in infos.get("torch", {}):
        t = infos["torch"]
        print(f"   torch float64 check: output, dx and {t['torch_vs_refdiff_float64_tensors_checked'] - 2} parameter "
              f"gradients agree with refdiff's, worst {t['torch_vs_refdiff_float64_worst_rel_diff']:.2g} of the "
              f"tensor's largest entry (bound {CHECK64_RTOL})")
    for k in workers:
        print(f"{k:>8} worker holds {', '.join(libraries[k]) or 'none'} of torch, numba, refdiff_cuda, "
              f"threadpoolctl; first loss {losses[k]:.6f}")
    out = dict(benchmark=f"{a.model} training step (forward + backward + Adam), float32", batch=B,
               threads=a.threads, worker_libraries=libraries, isolation_violations=bad,
               first_loss=losses, first_loss_rel_diff_vs_reference=loss_rel, workers=infos, notes=notes,
               malloc=dict(setting=MALLOC, worker_environment=_worker_env("torch", a.threads)), environment=environment())
    if a.check:
        out.update(check=True, steps=a.steps)
        print("isolation and first losses:", "ok" if not bad else f"VIOLATED {bad}", "(check mode: no timings reported)")
        if a.out:
            write_json(a.out, out)
        return 1 if bad else 0
    res = {k: float(np.median(v)) for k, v in times.items()}
    best = {k: float(np.min(v)) for k, v in times.items()}
    mflop = MFLOP_PER_IMAGE if a.model == MODEL else flops_per_image(a.model)
    gflops = {k: mflop * B / 1e3 / v for k, v in res.items()}
    out.update(rounds=a.rounds, block=a.block, ref_rounds=a.ref_rounds,
               seconds_median=res, seconds_min=best, seconds_all=times,
               mflop_per_image=mflop, gflops=gflops, gemm_peak_gflops_float32=peak,
               fraction_of_peak={k: v / peak for k, v in gflops.items()},
               speedup_vs_reference={k: res["numpy"] / v for k, v in res.items()})
    if "torch" in res:
        out["speed_vs_torch_median"] = {k: res["torch"] / v for k, v in res.items()}
        out["speed_vs_torch_min"] = {k: best["torch"] / v for k, v in best.items()}
    for k in res:
        print(f"{k:>8}: {res[k]:.3f} s/step  {gflops[k]:6.1f} GFLOP/s  ({gflops[k] / peak:.0%} of the {peak:.0f} "
              f"GFLOP/s GEMM peak)  x{res['numpy'] / res[k]:.1f} vs reference")
    if bad:
        print(f"warning: a worker holds another implementation's library, or the first losses differ: {bad}")
    write_json(a.out or os.path.join(HERE, "results", f"train_step_{a.model}_b{B}.json"), out)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
