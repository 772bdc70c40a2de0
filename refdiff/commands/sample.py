"""`refdiff sample`: draw images from a checkpoint written by `refdiff train` (see refdiff/generate.py).

    refdiff sample --checkpoint runs/ddpm-seed/checkpoint.npz --n 64 --sampler ddim --steps 50 --out DIR [--gif]
    refdiff sample --checkpoint runs/ddpm-cond/checkpoint.npz --class 0,1,2,3,4,5,6,7,8,9 --n 100 \
        --guidance 2 --sampler ddim --steps 100 --out DIR

Writes DIR/samples.npy ((N, 1, 28, 28) float32, clipped to [-1, 1]), DIR/grid.png,
DIR/sample.json, with --class DIR/labels.npy ((N,) int64: the class asked for each image),
and with --gif DIR/denoise.gif. --class K1,...,Km spreads the N images over the m classes in
contiguous blocks (refdiff.prediction.class_labels: N = 10 m gives rows of one class in the
grid); --guidance W is classifier-free guidance (0: unconditional, 1: conditional, the
default). Diffusion models (eps, x0 or v prediction: refdiff.prediction) go through
refdiff.ddpm's samplers (EMA weights unless --no-ema); VAE and GAN through model.sample. The
sampler flags map onto SampleConfig.sampler_args, the options of
refdiff.ddpm.sample_from_checkpoint.
"""
from __future__ import annotations

import sys

from .common import add_backend_flag, int_list, nonnegative_float, positive_float, positive_int


def add_arguments(p):
    from ..ddpm import DDPM_SAMPLERS
    from ..solvers import CHECKPOINT_SAMPLERS

    p.add_argument("--checkpoint", required=True, help="a checkpoint.npz from refdiff train")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--n", type=positive_int, default=64, help="number of images (default %(default)s)")
    p.add_argument("--sampler", default="ddpm", choices=DDPM_SAMPLERS + CHECKPOINT_SAMPLERS,
                   help="ddpm: ancestral, all N steps; ddim: --steps of DDIM (default 50); "
                        "em: reverse VP SDE, --steps Euler-Maruyama steps (default 1000); "
                        "dpm2m, edm, edm-sde, rk45, heun-sde: refdiff.solvers (see its sample_from_checkpoint)")
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
    p.add_argument("--class", dest="classes", type=int_list, default=None, metavar="K[,K2,...]",
                   help="class-conditional models: the class(es) to draw; --n images spread over them in blocks")
    p.add_argument("--guidance", type=nonnegative_float, default=None, metavar="W",
                   help="classifier-free guidance scale with --class: eps_u + W (eps_c - eps_u) "
                        "(0: unconditional, 1: conditional (default), > 1: guided)")
    p.add_argument("--rtol", type=positive_float, default=1e-5, help="rk45 tolerances (default 1e-5)")
    p.add_argument("--atol", type=positive_float, default=1e-5)
    p.add_argument("--inpaint", metavar="MASK.npy", default=None,
                   help="fill the pixels where this 0/1 mask is 0 (one image's shape, or --from's) in the images "
                        "of --from, with --sampler em or heun-sde (refdiff.inpaint)")
    p.add_argument("--from", dest="inpaint_from", metavar="IMAGES.npy", default=None,
                   help="the images to inpaint, (N, 1, 28, 28) in [-1, 1]; the first --n are used")
    p.add_argument("--resample", type=positive_int, default=None, metavar="U",
                   help="--inpaint: RePaint's resampling, each block of --jump steps done U times with the "
                        "state re-noised between (default 1: the plain replacement)")
    p.add_argument("--jump", type=positive_int, default=None, metavar="J",
                   help="--inpaint with --resample: steps per resampled block (default 1: RePaint's Algorithm 1)")
    add_backend_flag(p)


def sampler_args(args):
    """The flags that are options of refdiff.ddpm.sample_from_checkpoint."""
    return dict(sampler=args.sampler, steps=args.steps, eta=args.eta, variance=args.variance,
                spacing=args.spacing, clip=args.clip, batch=args.batch)


def run(args):
    from ..generate import SampleConfig, sample_to_dir

    from ..solvers import CHECKPOINT_SAMPLERS

    if (args.resample is not None or args.jump is not None) and not args.inpaint:
        raise ValueError("--resample and --jump are options of --inpaint (RePaint's resampling)")
    if args.sampler in CHECKPOINT_SAMPLERS or args.inpaint or args.inpaint_from:
        unused = [f for f, on in (("--eta", args.eta != 0), ("--spacing", args.spacing), ("--clip", args.clip),
                                  ("--variance", args.variance != "beta")) if on]
        if unused:
            raise ValueError(f"{', '.join(unused)} belong to the ddpm, ddim and em samplers; "
                             f"{'--inpaint' if args.inpaint else args.sampler} does not use them")
        cfg = SampleConfig(checkpoint=args.checkpoint, n=args.n, seed=args.seed, use_ema=not args.no_ema,
                           gif=args.gif, frames=args.frames, backend=args.backend, classes=args.classes,
                           guidance=args.guidance,
                           sampler_args=dict(sampler=args.sampler, steps=args.steps, batch=args.batch,
                                             rtol=args.rtol, atol=args.atol))
        if args.inpaint:
            cfg.sampler_args.update(resample=args.resample or 1, jump=args.jump or 1)
    else:
        cfg = SampleConfig(checkpoint=args.checkpoint, n=args.n, seed=args.seed, use_ema=not args.no_ema,
                           gif=args.gif, frames=args.frames, backend=args.backend, classes=args.classes,
                           guidance=args.guidance, sampler_args=sampler_args(args))
    info = sample_to_dir(cfg, args.out, log=lambda s: print(s, file=sys.stderr), inpaint_mask=args.inpaint,
                         inpaint_from=args.inpaint_from)
    print(f"{args.n} images from {info['model']} in {info['sample_seconds']:.1f}s -> {args.out}", file=sys.stderr)
    return 0
