"""`refdiff ring`: the report's 2-D ring experiment end to end (see refdiff/ring.py)."""
from __future__ import annotations

import dataclasses
import os
import time

import numpy as np

from ..ring import SDE_DEFAULTS, RingConfig, evaluate, save_checkpoint, train
from .common import Progress, positive_float, positive_int, write_json


def add_arguments(p):
    d = RingConfig()
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--data", default=d.data, choices=["ring", "moons", "swiss_roll", "gmm"])
    p.add_argument("--sde", default=d.sde, choices=sorted(SDE_DEFAULTS))
    p.add_argument("--loss", default=d.loss, help="dsm | ssm | ssm-vr | ssm-fd")
    p.add_argument("--sampler", default=d.sampler, choices=["em", "pc", "ode"])
    p.add_argument("--steps", type=positive_int, default=d.steps, help="reverse-time steps")
    p.add_argument("--train-steps", type=positive_int, default=d.train_steps)
    p.add_argument("--batch", type=positive_int, default=d.batch)
    p.add_argument("--lr", type=positive_float, default=d.lr)
    p.add_argument("--widths", type=lambda s: tuple(positive_int(w) for w in s.split(",")), default=d.widths,
                   help="hidden widths of the MLP, comma-separated (default %(default)s)")
    p.add_argument("--n", type=positive_int, default=d.n, help="points generated and scored")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--backend", default=d.backend)
    p.add_argument("--no-plot", action="store_true", help="skip ring.png")


def run(args):
    cfg = RingConfig(data=args.data, sde=args.sde, loss=args.loss, sampler=args.sampler,
                     steps=args.steps, train_steps=args.train_steps, batch=args.batch, lr=args.lr, widths=args.widths,
                     n=args.n, seed=args.seed, backend=args.backend)
    cfg.validate()
    os.makedirs(args.out, exist_ok=True)
    t0 = time.perf_counter()
    model, ema, sde, history = train(cfg, Progress(cfg.train_steps, "train step"))
    train_s = time.perf_counter() - t0
    save_checkpoint(os.path.join(args.out, "checkpoint.npz"), cfg, model, ema, history)
    x, real, m, sample_s = evaluate(cfg, model, ema, sde)
    m.update(n=cfg.n, train_seconds=train_s, sample_seconds=sample_s, seed=cfg.seed,
             config=dataclasses.asdict(cfg), final_loss=float(sum(history[-100:]) / min(100, len(history))))
    write_json(os.path.join(args.out, "metrics.json"), m)
    np.save(os.path.join(args.out, "samples.npy"), x)
    if not args.no_plot:
        from ..plots import ring_figure
        ring_figure(os.path.join(args.out, "ring.png"), cfg, model, ema, sde, x, real)
    print(f"frechet_distance {m['frechet_distance']:.3g} (real-vs-real {m['frechet_distance_real_vs_real']:.3g}), "
          f"sliced_wasserstein {m['sliced_wasserstein']:.3g} (real-vs-real {m['sliced_wasserstein_real_vs_real']:.3g}); "
          f"train {train_s:.0f}s, sample {sample_s:.0f}s -> {args.out}")
    return 0
