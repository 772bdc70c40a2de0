"""`refdiff evaluate`: score a file of images with the MNIST classifier (see refdiff/image_scores.py).

    refdiff evaluate --samples runs/vae/samples.npy --out runs/vae/eval [--classifier CKPT]

writes DIR/metrics.json: mml, mml_ratio, label_hist, label_entropy, fd_features,
fd_features_real_vs_real, n, classifier_accuracy (+ mml_real_heldout, classifier path).
"""
from __future__ import annotations

import os
import sys

import numpy as np


def add_arguments(p):
    p.add_argument("--samples", required=True, help="a .npy file of images (N, 1, 28, 28) in [-1, 1]")
    p.add_argument("--out", required=True, help="output directory (metrics.json)")
    p.add_argument("--classifier", default=None,
                   help="classifier checkpoint; default: the cached one ($REFDIFF_CACHE or "
                        "~/.cache/refdiff/classifier-mnist5k.npz), trained there on first use")
    p.add_argument("--data", default="mnist5k", help="real images for the reference statistics (default mnist5k)")


def run(args):
    from ..image_scores import score_file

    m = score_file(args.samples, args.out, args.classifier, args.data, log=lambda s: print(s, file=sys.stderr))
    print(f"n {m['n']}: mml {m['mml']:.3f} (ratio {m['mml_ratio']:.3f} to real held-out), "
          f"label entropy {m['label_entropy']:.3f} / {np.log(10):.3f}, fd_features {m['fd_features']:.3f} "
          f"(real-vs-real {m['fd_features_real_vs_real']:.3f}); classifier accuracy "
          f"{m['classifier_accuracy']:.4f} -> {os.path.join(args.out, 'metrics.json')}", file=sys.stdout)
    return 0
