"""`refdiff train`: train a model on images (see refdiff/train.py).

    refdiff train --data mnist5k --model unet-seed --epochs 82 --out runs/ddpm-seed
    refdiff train --data mnist5k --model unet-seed --epochs 82 --out runs/ddpm-seed --resume
    refdiff train --model unet-ddpm --model-arg num_classes=10 --pred v --label-dropout 0.1 \
        --warmup 500 --lr-schedule cosine --out runs/ddpm-cond

Writes DIR/checkpoint.npz and DIR/metrics.json at every epoch end; --resume continues a
stopped run from its last epoch and reproduces the uninterrupted run bit for bit.
"""
from __future__ import annotations

import argparse
import json
import sys

from .common import add_backend_flag, nonnegative_int, positive_float, positive_int, probability_below_one

INTERRUPTED = "nothing was written"      # before training starts; during it, the Trainer says what is on disk


def _model_arg(s):
    """KEY=VALUE with VALUE read as JSON when it parses (numbers, lists), else a string."""
    key, sep, value = s.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE; got {s!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def add_arguments(p):
    from ..losses import LOSSES
    from ..nn import MODELS
    from ..optim import LR_SCHEDULES
    from ..prediction import PREDICTIONS
    from ..train import TrainConfig

    d = TrainConfig()
    p.add_argument("--out", required=True, help="output directory (checkpoint.npz, metrics.json)")
    p.add_argument("--data", default=d.data, help="mnist5k | fashion | idx:DIR (default %(default)s)")
    p.add_argument("--model", default=d.model, choices=sorted(MODELS))
    p.add_argument("--model-arg", action="append", type=_model_arg, default=[], metavar="KEY=VALUE",
                   help="override a model default, e.g. --model-arg channels=[8,16] (repeatable)")
    p.add_argument("--epochs", type=positive_int, default=d.epochs, help="total epochs (default %(default)s)")
    p.add_argument("--batch", type=positive_int, default=None, help="default: the objective's (128 for DDPM)")
    p.add_argument("--lr", type=positive_float, default=None, help="default: the objective's (1e-4 for DDPM)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--loss", default=d.loss, choices=["ddpm"] + sorted(LOSSES), help="eps-models only")
    p.add_argument("--ema-decay", type=float, default=d.ema_decay, help="eps-models only (default %(default)s)")
    p.add_argument("--grad-clip", type=positive_float, default=None, help="max global gradient norm")
    p.add_argument("--limit", type=positive_int, default=None, help="train on the first N images only")
    p.add_argument("--schedule", default=d.schedule, choices=["linear", "cosine"],
                   help="DDPM noise schedule (default %(default)s; cosine: Nichol & Dhariwal 2021)")
    p.add_argument("--pred", default=d.pred, choices=list(PREDICTIONS),
                   help="what a diffusion network predicts: eps (default), x0 or v (Salimans & Ho 2022)")
    p.add_argument("--label-dropout", type=probability_below_one, default=d.label_dropout,
                   help="class-conditional models (--model-arg num_classes=K): probability of training a label "
                        "as the null label, for classifier-free guidance (default 0; 0.1 as Ho & Salimans)")
    p.add_argument("--warmup", type=nonnegative_int, default=d.warmup, help="linear lr warm-up steps (default 0)")
    p.add_argument("--lr-schedule", default=d.lr_schedule, choices=list(LR_SCHEDULES),
                   help="constant (default) or cosine decay to 0 over epochs x batches per epoch")
    add_backend_flag(p, d.backend)
    p.add_argument("--dtype", default=d.dtype, choices=["float32", "float64"])
    p.add_argument("--resume", action="store_true", help="continue the run whose checkpoint is in --out")


def run(args):
    from ..distributed import get_comm, on_root
    from ..io import output_run
    from ..train import TrainConfig, Trainer

    cfg = TrainConfig(data=args.data, model=args.model, model_args=dict(args.model_arg), epochs=args.epochs,
                      batch=args.batch, lr=args.lr, seed=args.seed, loss=args.loss, ema_decay=args.ema_decay,
                      grad_clip=args.grad_clip, limit=args.limit, backend=args.backend, dtype=args.dtype,
                      schedule=args.schedule, pred=args.pred, label_dropout=args.label_dropout, warmup=args.warmup,
                      lr_schedule=args.lr_schedule)
    cfg.validate()
    with on_root(output_run(args.out, log=lambda s: print(s, file=sys.stderr)), get_comm()):   # rank 0 writes
        trainer = Trainer(cfg, args.out, resume=args.resume)
        if trainer.epoch >= cfg.epochs:
            print(f"{trainer.path} already has {trainer.epoch} epochs (>= --epochs {cfg.epochs}): nothing to do")
            return 0
        m = trainer.model
        print(f"training {m.name} ({m.num_parameters():,} parameters, kind {m.kind}) on {len(trainer.x)} images "
              f"of {cfg.data}, batch {trainer.batch}, epochs {trainer.epoch + 1}..{cfg.epochs}, backend {cfg.backend}")
        try:
            history = trainer.fit()
        except KeyboardInterrupt:
            raise KeyboardInterrupt(f"{trainer.on_disk()}: continue with --resume") from None
    last = history[-1]
    print(f"epoch {last['epoch']}: loss {last['loss']:.5g}, {last['seconds']:.1f}s per epoch -> {args.out}")
    return 0
