"""`refdiff evaluate`: score a file of images with the MNIST classifier (see refdiff/image_scores.py).

    refdiff evaluate --samples runs/vae/samples.npy --out runs/vae/eval [--classifier CKPT] [--labels FILE|none]
    mpirun -n N refdiff evaluate ...        (the classifier's passes split over the ranks)

writes DIR/metrics.json: mml, mml_ratio, label_hist, label_entropy, fd_features,
fd_features_real_vs_real, n, classifier_accuracy (+ mml_real_heldout, classifier path).
With the classes the images were asked for (labels.npy next to the samples, as `refdiff
sample --class` writes it, or --labels FILE): class_accuracy and per_class (n, accuracy,
and fd_features against the real held-out digits of that class, for each class asked for).
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
    p.add_argument("--labels", default="auto", metavar="FILE",
                   help="a .npy of N integers 0..9, the class asked for each image: per-class scores; default "
                        "auto (labels.npy next to --samples if there is one), none to ignore one")


def run(args):
    from ..distributed import get_comm, launched_by_mpi
    from ..image_scores import score_file

    comm = get_comm() if launched_by_mpi() else None
    m = score_file(args.samples, args.out, args.classifier, args.data, log=lambda s: print(s, file=sys.stderr),
                   labels=args.labels, comm=comm)
    if m is None:             # a rank other than 0: rank 0 reports
        return 0
    print(f"n {m['n']}: mml {m['mml']:.3f} (ratio {m['mml_ratio']:.3f} to real held-out), "
          f"label entropy {m['label_entropy']:.3f} / {np.log(10):.3f}, fd_features {m['fd_features']:.3f} "
          f"(real-vs-real {m['fd_features_real_vs_real']:.3f}); classifier accuracy "
          f"{m['classifier_accuracy']:.4f} -> {os.path.join(args.out, 'metrics.json')}", file=sys.stdout)
    if "per_class" in m:
        print(f"asked-for class recognised: {m['class_accuracy']:.4f} overall", file=sys.stdout)
        for r in m["per_class"]:
            fd = "-" if r["fd_features"] is None else f"{r['fd_features']:.2f}"
            print(f"  class {r['label']}: n {r['n']}, accuracy {r['accuracy']:.3f}, fd_features {fd} "
                  f"(against the real held-out digits of class {r['label']})", file=sys.stdout)
    return 0
