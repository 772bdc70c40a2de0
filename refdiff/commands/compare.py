"""`refdiff compare`: the report's table 3.2 and figures 3.4-3.5 (see refdiff/compare.py).

    refdiff compare --out runs/compare --vae runs/vae/checkpoint.npz --gan runs/gan/checkpoint.npz \
                    [--ddpm runs/ddpm-seed/checkpoint.npz] [--n 1000] [--sampler ...]

Writes DIR/table.md, DIR/table.json, DIR/labels.png, DIR/best.png and DIR/samples-<row>.npy.
Under `mpirun -n N`, image k of a row draws from its own stream (the same images for every N)
and the ranks share the sampling and the classifier's passes; rank 0 scores and writes.
"""
from __future__ import annotations

import sys

from .common import add_backend_flag, positive_int


def add_arguments(p):
    from ..compare import ROWS
    from ..ddpm import DDPM_SAMPLERS
    from ..figures import ROW_TITLES

    p.add_argument("--out", required=True, help="output directory")
    for row in ROWS[1:]:
        p.add_argument(f"--{row}", default=None, metavar="CKPT", help=f"{ROW_TITLES[row]} checkpoint")
    p.add_argument("--n", type=positive_int, default=1000, help="images generated per model (default 1000)")
    p.add_argument("--sampler", default=None, choices=DDPM_SAMPLERS,
                   help="DDPM sampler (default: refdiff.ddpm's, ancestral over all N steps; ddim --steps 50 is ~20x faster)")
    p.add_argument("--steps", type=positive_int, default=None, help="DDPM sampling steps (default: the sampler's)")
    p.add_argument("--clip", action="store_true", help="DDPM samplers clip each step's x0 prediction to [-1, 1]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-ema", action="store_true", help="use raw weights even where a checkpoint has EMA weights")
    p.add_argument("--classifier", default=None, help="classifier checkpoint (default: the cached one)")
    p.add_argument("--data", default="mnist5k")
    add_backend_flag(p, help="where the models run while sampling (the scores are the same on every backend)")


def run(args):
    from ..compare import ROWS, CompareConfig, compare
    from ..distributed import get_comm, launched_by_mpi

    sampler_args = {k: v for k, v in (("sampler", args.sampler), ("steps", args.steps)) if v is not None}
    cfg = CompareConfig(checkpoints={row: getattr(args, row) for row in ROWS[1:] if getattr(args, row)},
                        n=args.n, seed=args.seed, use_ema=not args.no_ema, classifier=args.classifier,
                        data=args.data, backend=args.backend, sampler_args=dict(sampler_args, clip=args.clip))
    comm = get_comm() if launched_by_mpi() else None     # under mpirun: per-image streams, work split
    _, table = compare(cfg, args.out, log=lambda s: print(s, file=sys.stderr), comm=comm)
    if table is not None:      # rank 0 reports
        print(table)
    return 0
