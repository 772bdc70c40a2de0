"""`refdiff sample`: draw images from a checkpoint written by `refdiff train`.

    refdiff sample --checkpoint runs/ddpm-seed/checkpoint.npz --n 64 --sampler ddim --steps 50 --out DIR [--gif]

Writes DIR/samples.npy ((N, 1, 28, 28) float32, clipped to [-1, 1]), DIR/grid.png,
DIR/sample.json, and with --gif DIR/denoise.gif. Diffusion (eps) models go through
refdiff.ddpm's samplers (EMA weights unless --no-ema); VAE and GAN through model.sample.
"""
from __future__ import annotations

import os
import sys
import time

import numpy as np

from .common import positive_int, write_json


def add_arguments(p):
    p.add_argument("--checkpoint", required=True, help="a checkpoint.npz from refdiff train")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--n", type=positive_int, default=64, help="number of images (default %(default)s)")
    p.add_argument("--sampler", default="ddpm", choices=["ddpm", "ddim", "em"],
                   help="ddpm: ancestral, all N steps; ddim: --steps of DDIM (default 50); "
                        "em: reverse VP SDE, --steps Euler-Maruyama steps (default 1000)")
    p.add_argument("--steps", type=positive_int, default=None)
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta in [0, 1] (default 0: deterministic)")
    p.add_argument("--variance", default="beta", choices=["beta", "beta_tilde"], help="ddpm sampler variance")
    p.add_argument("--spacing", default=None, choices=["uniform", "linspace", "quadratic", "trailing", "squared"],
                   help="ddim: uniform (default when --steps divides N, else linspace), linspace, quadratic or "
                        "trailing; em: uniform (default) or squared")
    p.add_argument("--clip", action="store_true", help="clip the predicted x0 to [-1, 1] at each step")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=positive_int, default=256, help="images per model call")
    p.add_argument("--gif", action="store_true", help="also write denoise.gif (the denoising, frame by frame)")
    p.add_argument("--frames", type=positive_int, default=40, help="frames in the GIF (default %(default)s)")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights, not the EMA")
    p.add_argument("--backend", default="numpy", choices=["numpy", "numba", "numba-cuda", "cupy"])


def run(args):
    from .. import ddpm, viz
    from ..checkpoint import load_model

    if not os.path.exists(args.checkpoint):
        raise FileNotFoundError(f"checkpoint {args.checkpoint!r} does not exist")
    model, sections, meta = load_model(args.checkpoint, backend=args.backend, use_ema=not args.no_ema)
    rng = np.random.default_rng(args.seed)
    t0, traj = time.perf_counter(), None
    info = dict(checkpoint=os.path.abspath(args.checkpoint), model=model.name, kind=model.kind,
                epoch=meta.get("epoch"), ema=bool(not args.no_ema and sections["ema"]), n=args.n, seed=args.seed)
    if model.kind == "eps":
        if args.frames < 2:
            raise ValueError(f"--frames must be >= 2; got {args.frames}")
        out = ddpm.sample_from_checkpoint(model, meta, args.n, rng, sampler=args.sampler, steps=args.steps,
                                          eta=args.eta, variance=args.variance, spacing=args.spacing,
                                          clip=args.clip, batch=args.batch, return_trajectory=args.gif,
                                          frames=args.frames)
        x, traj = out if args.gif else (out, None)
        info.update(sampler=args.sampler, steps=args.steps, eta=args.eta, variance=args.variance,
                    spacing=args.spacing, clip=args.clip)
    elif callable(getattr(model, "sample", None)):
        if args.gif:
            raise ValueError(f"--gif shows a denoising chain; a {model.kind!r} model has none")
        x = model.ops.to_numpy(model.sample(args.n, rng))
    else:
        raise ValueError(f"{args.checkpoint!r} holds a {model.name!r} model, which cannot generate images")
    info["sample_seconds"] = time.perf_counter() - t0
    x = np.clip(np.asarray(x, dtype=np.float32), -1, 1)
    os.makedirs(args.out, exist_ok=True)
    np.save(os.path.join(args.out, "samples.npy"), x)
    viz.save_grid(os.path.join(args.out, "grid.png"), x)
    if traj is not None:
        viz.save_gif(os.path.join(args.out, "denoise.gif"), traj)
    write_json(os.path.join(args.out, "sample.json"), info)
    print(f"{args.n} images from {model.name} in {info['sample_seconds']:.1f}s -> {args.out}", file=sys.stderr)
    return 0
