"""`refdiff ring`: the report's 2-D ring experiment end to end (see refdiff/ring.py)."""
from __future__ import annotations

import sys

from .common import add_backend_flag, positive_float, positive_int

INTERRUPTED = "nothing was written (a ring run writes its files only once it has finished)"


def add_arguments(p):
    from ..losses import LOSSES
    from ..ring import SDE_DEFAULTS, RingConfig
    from ..samplers import SAMPLERS

    d = RingConfig()
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--data", default=d.data, choices=["ring", "moons", "swiss_roll", "gmm"])
    p.add_argument("--sde", default=d.sde, choices=sorted(SDE_DEFAULTS))
    p.add_argument("--loss", default=d.loss, help=" | ".join(sorted(LOSSES)) + " (default %(default)s)")
    p.add_argument("--sampler", default=d.sampler, choices=sorted(SAMPLERS))
    p.add_argument("--steps", type=positive_int, default=d.steps, help="reverse-time steps")
    p.add_argument("--train-steps", type=positive_int, default=d.train_steps)
    p.add_argument("--batch", type=positive_int, default=d.batch)
    p.add_argument("--lr", type=positive_float, default=d.lr)
    p.add_argument("--widths", type=lambda s: tuple(positive_int(w) for w in s.split(",")), default=d.widths,
                   help="hidden widths of the MLP, comma-separated (default %(default)s)")
    p.add_argument("--n", type=positive_int, default=d.n, help="points generated and scored")
    p.add_argument("--seed", type=int, default=d.seed)
    add_backend_flag(p, d.backend)
    p.add_argument("--no-plot", action="store_true", help="skip ring.png")
    p.add_argument("--force", action="store_true", help="overwrite a ring run already in --out")


def run(args):
    from .. import ring
    from ..io import Progress

    cfg = ring.RingConfig(data=args.data, sde=args.sde, loss=args.loss, sampler=args.sampler, steps=args.steps,
                          train_steps=args.train_steps, batch=args.batch, lr=args.lr, widths=args.widths,
                          n=args.n, seed=args.seed, backend=args.backend)
    m = ring.run(cfg, args.out, force=args.force, plot=not args.no_plot,
                 progress=Progress(cfg.train_steps, "train step"), log=lambda s: print(s, file=sys.stderr))
    print(f"frechet_distance {m['frechet_distance']:.3g} (real-vs-real {m['frechet_distance_real_vs_real']:.3g}), "
          f"sliced_wasserstein {m['sliced_wasserstein']:.3g} (real-vs-real {m['sliced_wasserstein_real_vs_real']:.3g}); "
          f"train {m['train_seconds']:.0f}s, sample {m['sample_seconds']:.0f}s -> {args.out}")
    return 0
