"""`refdiff compare`: the report's table 3.2 and figures 3.4-3.5, done with care.

    refdiff compare --out runs/compare --vae runs/vae/checkpoint.npz --gan runs/gan/checkpoint.npz \
                    [--ddpm runs/ddpm-seed/checkpoint.npz] [--n 1000] [--sampler ...]

Rows: real held-out MNIST, then each model given (any subset). Each model draws `--n`
images from its checkpoint with its own fixed seed (rng = default_rng([seed, row]), so
adding or dropping a model changes no other row); all sets are scored by the same
classifier, in the same [-1, 1] pixel range (clipped, never min-max normalised; DDPM
outputs are clipped like every other model's). Writes DIR/table.md, DIR/table.json,
DIR/labels.png (predicted-label histograms side by side), DIR/best.png (best image per label
per model, by max logit) and DIR/samples-<row>.npy.
"""
from __future__ import annotations

import os
import sys
import time

import numpy as np

from .common import positive_int, write_json

ROWS = ("real", "vae", "gan", "ddpm")
ROW_TITLES = {"real": "real (held-out)", "vae": "VAE", "gan": "GAN", "ddpm": "DDPM"}
# The report's table 3.2 (100 images, its own classifier): MML and the ratio to its real row.
REPORT_MML = {"real": 18.9480, "vae": 11.1808, "gan": 11.0247, "ddpm": 12.7437}


def add_arguments(p):
    p.add_argument("--out", required=True, help="output directory")
    for row in ROWS[1:]:
        p.add_argument(f"--{row}", default=None, metavar="CKPT", help=f"{ROW_TITLES[row]} checkpoint")
    p.add_argument("--n", type=positive_int, default=1000, help="images generated per model (default 1000)")
    from ..ddpm import DDPM_SAMPLERS
    p.add_argument("--sampler", default=None, choices=DDPM_SAMPLERS,
                   help="DDPM sampler (default: refdiff.ddpm's, ancestral over all N steps; ddim --steps 50 is ~20x faster)")
    p.add_argument("--steps", type=positive_int, default=None, help="DDPM sampling steps (default: the sampler's)")
    p.add_argument("--clip", action="store_true", help="DDPM samplers clip each step's x0 prediction to [-1, 1]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-ema", action="store_true", help="use raw weights even where a checkpoint has EMA weights")
    p.add_argument("--classifier", default=None, help="classifier checkpoint (default: the cached one)")
    p.add_argument("--data", default="mnist5k")
    p.add_argument("--backend", default="numpy", choices=["numpy", "numba", "numba-cuda", "cupy"],
                   help="where the models run while sampling (the scores are the same on every backend)")


# --- generation -------------------------------------------------------------------------------------
def load_checkpoint(row, path, use_ema=True, backend=None):
    """The model in `path`, checked to be of the kind the row needs; -> (model, meta, info)."""
    from ..checkpoint import load_model

    if not os.path.exists(path):
        raise FileNotFoundError(f"--{row} checkpoint {path!r} does not exist")
    model, sections, meta = load_model(path, backend=backend, use_ema=use_ema)
    want = {"vae": "vae", "gan": "gan", "ddpm": "eps"}[row]
    if model.kind != want:
        raise ValueError(f"--{row} {path!r} holds a {model.name!r} model (kind {model.kind!r}); expected kind {want!r}")
    return model, meta, dict(checkpoint=os.path.abspath(path), architecture=model.name,
                             ema=bool(use_ema and sections["ema"]))


def generate(row, model, meta, n, rng, sampler=None, steps=None, clip=False):
    """n images (n, 1, 28, 28) in [-1, 1] from a loaded model; -> (images, info). Every
    model's output is clipped to [-1, 1] the same way (DDPM samplers may overshoot)."""
    info = {}
    if row == "ddpm":
        x, info = _ddpm_sample(model, meta, n, rng, sampler, steps, clip)
    else:
        x = model.ops.to_numpy(model.sample(n, rng))
    return np.clip(np.asarray(x, dtype=np.float32), -1, 1), info


def _ddpm_sample(model, meta, n, rng, sampler, steps, clip):
    """Through refdiff.ddpm's samplers (its defaults where sampler/steps are None)."""
    from .. import ddpm
    kw = {k: v for k, v in (("sampler", sampler), ("steps", steps)) if v is not None}
    x = ddpm.sample_from_checkpoint(model, meta, n, rng, clip=clip, **kw)
    return x, dict(sampler=sampler or "ddpm", steps=steps, clip=clip)


# --- outputs ------------------------------------------------------------------------------------------
def table_markdown(rows, floor):
    head = ("| model | n | MML | MML ratio | report's MML ratio (100 images) | label entropy (max 2.303) "
            "| missing labels | FD features (floor %.2f) |\n|---|---|---|---|---|---|---|---|\n" % floor)
    lines = []
    for r in rows:
        m, key = r["metrics"], r["row"]
        missing = [k for k, c in enumerate(m["label_hist"]) if c == 0]
        lines.append(f"| {ROW_TITLES[key]} | {m['n']} | {m['mml']:.3f} | {m['mml_ratio']:.3f} | "
                     f"{REPORT_MML[key] / REPORT_MML['real']:.3f} | {m['label_entropy']:.3f} | "
                     f"{','.join(map(str, missing)) or '-'} | {m['fd_features']:.2f} |")
    hist = "\n\nPredicted-label counts (0..9):\n\n" + "\n".join(
        f"- {ROW_TITLES[r['row']]}: {r['metrics']['label_hist']}" for r in rows)
    real = rows[0]["metrics"]
    notes = (f"\n\nClassifier held-out accuracy {real['classifier_accuracy']}; MML of real held-out digits "
             f"{real['mml']:.3f} (the report's classifier: 18.948). FD floor = real held-out vs real "
             f"training features. Sources:\n\n")
    sources = [f"- {ROW_TITLES[r['row']]}: " + ", ".join(f"{k} {v}" for k, v in r["info"].items()
                                                         if k != "sample_seconds") for r in rows]
    return head + "\n".join(lines) + hist + notes + "\n".join(sources) + "\n"


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def labels_figure(path, rows):
    plt = _plt()
    fig, ax = plt.subplots(figsize=(9, 3.6))
    width = 0.8 / len(rows)
    for j, r in enumerate(rows):
        h = np.asarray(r["metrics"]["label_hist"], dtype=float)
        ax.bar(np.arange(10) + (j - (len(rows) - 1) / 2) * width, h / h.sum(), width, label=ROW_TITLES[r["row"]])
    ax.axhline(0.1, color="0.5", lw=0.8, ls="--")
    ax.set_xticks(range(10))
    ax.set_xlabel("predicted label")
    ax.set_ylabel("fraction of images")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def best_figure(path, rows):
    plt = _plt()
    fig, axes = plt.subplots(len(rows), 10, figsize=(10, 1.15 * len(rows) + 0.3), squeeze=False)
    for i, r in enumerate(rows):
        for k, (img, top) in enumerate(r["best"]):
            ax = axes[i, k]
            ax.set_xticks([]), ax.set_yticks([])
            if img is None:
                ax.text(0.5, 0.5, "none", ha="center", va="center", transform=ax.transAxes)
            else:
                ax.imshow(img, cmap="gray", vmin=-1, vmax=1)
                ax.set_title(f"{top:.1f}", fontsize=7)
            if k == 0:
                ax.set_ylabel(ROW_TITLES[r["row"]], fontsize=8)
    fig.suptitle("best image per predicted label (max logit above each)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args):
    from ..evaluate import best_per_label, build_evaluator

    # load every checkpoint first: a wrong path or kind fails before the classifier work
    given = [(row, *load_checkpoint(row, getattr(args, row), not args.no_ema, args.backend))
             for row in ROWS[1:] if getattr(args, row)]
    ev, clf_path = build_evaluator(args.classifier, args.data)
    os.makedirs(args.out, exist_ok=True)
    m_real, _ = ev.score(ev.real_heldout, "real held-out images")
    rows = [dict(row="real", metrics=m_real, info=dict(source=args.data, split="held-out"),
                 best=best_per_label(ev.real_heldout, ev.real_heldout_logits))]
    for row, model, meta, info in given:
        t0 = time.perf_counter()
        rng = np.random.default_rng([args.seed, ROWS.index(row)])
        x, extra = generate(row, model, meta, args.n, rng, args.sampler, args.steps, args.clip)
        info.update(extra, sample_seconds=time.perf_counter() - t0)
        np.save(os.path.join(args.out, f"samples-{row}.npy"), x)
        m, logits = ev.score(x, f"{row} samples", allow_nonnegative=True)   # generated in [-1, 1] by construction
        rows.append(dict(row=row, metrics=m, info=info, best=best_per_label(x, logits)))
        print(f"{row}: {args.n} images in {info['sample_seconds']:.0f}s, mml ratio {m['mml_ratio']:.3f}, "
              f"label entropy {m['label_entropy']:.3f}, fd_features {m['fd_features']:.2f}", file=sys.stderr)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(table_markdown(rows, ev.fd_floor))
    write_json(os.path.join(args.out, "table.json"), dict(
        rows=[dict(model=r["row"], **r["metrics"], **r["info"]) for r in rows],
        n=args.n, seed=args.seed, classifier=os.path.abspath(clf_path), classifier_accuracy=ev.accuracy,
        report_mml=REPORT_MML))
    labels_figure(os.path.join(args.out, "labels.png"), rows)
    best_figure(os.path.join(args.out, "best.png"), rows)
    with open(os.path.join(args.out, "table.md")) as f:
        print(f.read())
    return 0
