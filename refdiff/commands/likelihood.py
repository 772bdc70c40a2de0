"""`refdiff likelihood`: bits per dimension of real images under a diffusion checkpoint.

    refdiff likelihood --checkpoint runs/ddpm/checkpoint.npz --data mnist5k --split heldout --n 500 --out DIR

The first n images of the split, dequantised, through the probability-flow ODE of the
checkpoint's VP SDE (score_sde's convention, see refdiff/likelihood.py). The flags map onto
refdiff.likelihood.LikelihoodConfig; likelihood_to_dir writes DIR/metrics.json: bits/dim mean
and standard error over the images, the NFE per batch, and the settings. Under `mpirun -n N`,
image k draws from its own stream default_rng([seed, k]) and whole batches (ODE solves) are
split over the ranks: every N gives the same bits/dim; rank 0 writes.
"""
from __future__ import annotations

import sys

from .common import add_backend_flag, positive_float, positive_int


def add_arguments(p):
    from ..likelihood import DIVERGENCES, PROBES, ROUTES

    p.add_argument("--checkpoint", required=True, help="a checkpoint.npz of a diffusion (eps) model")
    p.add_argument("--out", required=True, help="output directory (metrics.json)")
    p.add_argument("--data", default="mnist5k", help="mnist5k | fashion | idx:DIR (default mnist5k)")
    p.add_argument("--split", default="heldout", help="train | heldout (default heldout)")
    p.add_argument("--n", type=positive_int, default=500, help="images, the first n of the split (default %(default)s)")
    p.add_argument("--batch", type=positive_int, default=100, help="images per ODE solve (default %(default)s)")
    p.add_argument("--divergence", default="hutchinson", choices=DIVERGENCES,
                   help="hutchinson (default) or exact (one JVP per pixel: small images only)")
    p.add_argument("--probes", type=positive_int, default=1, help="Hutchinson probes per image (default 1)")
    p.add_argument("--probe", default="rademacher", choices=PROBES)
    p.add_argument("--route", default="auto", choices=ROUTES,
                   help="the trace's Jacobian product: vjp (the model's backward pass), jvp (its forward mode); "
                        "auto (default): vjp where the model has a backward")
    p.add_argument("--rtol", type=positive_float, default=1e-5, help="RK45 relative tolerance (default 1e-5)")
    p.add_argument("--atol", type=positive_float, default=1e-5, help="RK45 absolute tolerance (default 1e-5)")
    p.add_argument("--t-min", type=positive_float, default=1e-5,
                   help="time the ODE starts from (default 1e-5, as score_sde)")
    p.add_argument("--seed", type=int, default=0, help="dequantisation noise and probes")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights, not the EMA")
    add_backend_flag(p)


def run(args):
    from ..distributed import get_comm, launched_by_mpi
    from ..likelihood import LikelihoodConfig, likelihood_to_dir

    cfg = LikelihoodConfig(checkpoint=args.checkpoint, data=args.data, split=args.split, n=args.n, batch=args.batch,
                           divergence=args.divergence, probes=args.probes, probe=args.probe, rtol=args.rtol,
                           atol=args.atol, t_min=args.t_min, seed=args.seed, use_ema=not args.no_ema,
                           backend=args.backend, route=args.route)
    comm = get_comm() if launched_by_mpi() else None     # under mpirun: whole ODE solves split over the ranks
    m = likelihood_to_dir(cfg, args.out, log=lambda s: print(s, file=sys.stderr), comm=comm)
    if m is None:              # a rank other than 0: rank 0 reports
        return 0
    se = "" if m["bits_per_dim_se"] is None else f" +- {m['bits_per_dim_se']:.4f}"
    print(f"bits/dim {m['bits_per_dim_mean']:.4f}{se} (n {args.n}, NFE {m['nfe_mean']:.0f}) -> {args.out}/metrics.json",
          file=sys.stderr)
    return 0
