"""`refdiff evaluate`: score a file of images with the MNIST classifier (see refdiff/evaluate.py).

    refdiff evaluate --samples runs/vae/samples.npy --out runs/vae/eval [--classifier CKPT]

writes DIR/metrics.json: mml, mml_ratio, label_hist, label_entropy, fd_features,
fd_features_real_vs_real, n, classifier_accuracy (+ mml_real_heldout, classifier path).
"""
from __future__ import annotations

import os
import sys

import numpy as np

from .common import write_json


def add_arguments(p):
    p.add_argument("--samples", required=True, help="a .npy file of images (N, 1, 28, 28) in [-1, 1]")
    p.add_argument("--out", required=True, help="output directory (metrics.json)")
    p.add_argument("--classifier", default=None,
                   help="classifier checkpoint; default: the cached one ($REFDIFF_CACHE or "
                        "~/.cache/refdiff/classifier-mnist5k.npz), trained there on first use")
    p.add_argument("--data", default="mnist5k", help="real images for the reference statistics (default mnist5k)")


def load_samples(path):
    if not os.path.exists(path):
        raise FileNotFoundError(f"samples file {path!r} does not exist")
    try:
        x = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise ValueError(f"samples file {path!r} is not a readable .npy array ({exc})") from None
    if not isinstance(x, np.ndarray):
        raise ValueError(f"samples file {path!r} holds several arrays (.npz); give one .npy array")
    return x


def run(args):
    from ..evaluate import build_evaluator, check_images

    x = check_images(load_samples(args.samples), f"samples in {args.samples!r}")   # fail before any training
    ev, clf_path = build_evaluator(args.classifier, args.data)
    metrics, _ = ev.score(x, "samples")
    metrics.update(samples=os.path.abspath(args.samples), classifier=os.path.abspath(clf_path), data=args.data)
    os.makedirs(args.out, exist_ok=True)
    write_json(os.path.join(args.out, "metrics.json"), metrics)
    print(f"n {metrics['n']}: mml {metrics['mml']:.3f} (ratio {metrics['mml_ratio']:.3f} to real held-out), "
          f"label entropy {metrics['label_entropy']:.3f} / {np.log(10):.3f}, fd_features {metrics['fd_features']:.3f} "
          f"(real-vs-real {metrics['fd_features_real_vs_real']:.3f}); classifier accuracy "
          f"{metrics['classifier_accuracy']:.4f} -> {os.path.join(args.out, 'metrics.json')}", file=sys.stdout)
    return 0
