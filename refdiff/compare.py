"""The report's table 3.2 and figures 3.4-3.5, done with care: real held-out MNIST digits,
then images from each model given (VAE, GAN, DDPM; any subset), all scored by the same
classifier (refdiff.image_scores) in the same [-1, 1] pixel range (clipped, never min-max
normalised; DDPM outputs are clipped like every other model's).

    compare(CompareConfig(...), out_dir) -> rows     (what `refdiff compare` does)

Each model draws `n` images from its checkpoint with its own fixed seed
(rng = default_rng([seed, row]), so adding or dropping a model changes no other row).
Under mpirun (`comm` given: refdiff.distributed), image k of a row draws from its own stream
default_rng([seed, row, k]) and rank r draws images [lo_r, hi_r) (sample_split), so every
number of ranks (1 included) draws the same images; the classifier's passes are split over
the ranks too (refdiff.image_scores.Evaluator), and rank 0 alone scores and writes.
Writes DIR/table.md, DIR/table.json, DIR/labels.png (predicted-label histograms side by
side), DIR/best.png (best image per label per model, by max logit) and
DIR/samples-<row>.npy, each atomically, holding DIR's RunLock.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import numpy as np

from . import io
from .figures import ROW_TITLES, best_figure, labels_figure
from .generate import KINDS, generate, load_generator

ROWS = ("real", "vae", "gan", "ddpm")
# The report's table 3.2 (100 images, its own classifier): MML and the ratio to its real row.
REPORT_MML = {"real": 18.9480, "vae": 11.1808, "gan": 11.0247, "ddpm": 12.7437}


@dataclass
class CompareConfig:
    checkpoints: dict                   # row ("vae", "gan", "ddpm") -> checkpoint path; any subset
    n: int = 1000                       # images generated per model
    seed: int = 0
    use_ema: bool = True                # EMA weights where a checkpoint has them
    classifier: str | None = None       # classifier checkpoint (None: the cached one)
    data: str = "mnist5k"               # the real images
    backend: str = "numpy"              # where the models run while sampling (scores are the same)
    sampler_args: dict = field(default_factory=dict)   # DDPM: refdiff.ddpm.sample_from_checkpoint's options

    def validate(self):
        unknown = sorted(set(self.checkpoints) - set(ROWS[1:]))
        if unknown:
            raise ValueError(f"compare: unknown rows {unknown}; rows are {ROWS[1:]}")
        if isinstance(self.n, bool) or not isinstance(self.n, (int, np.integer)) or self.n < 2:
            raise ValueError(f"compare: n must be an integer >= 2; got {self.n!r}")
        return self


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


def _draw(comm, model, meta, cfg, row):
    """The row's cfg.n images: one stream default_rng([seed, row]) in one process; per-image
    streams split over the ranks of `comm` (on rank 0 only; None on the others)."""
    kw = cfg.sampler_args if row == "ddpm" else {}
    if comm is None:
        x, _, info = generate(model, meta, cfg.n, np.random.default_rng([cfg.seed, ROWS.index(row)]), **kw)
        return x, info
    from .distributed import sample_split

    extra = {}

    def draw(count, rng):
        x, _, extra["info"] = generate(model, meta, count, rng, **kw)
        return x
    x = sample_split(comm, draw, cfg.n, (cfg.seed, ROWS.index(row)), batch=kw.get("batch"))
    return x, dict(extra["info"], ranks=comm.size, streams="per image: default_rng([seed, row, k])")


def compare(cfg, out_dir, log=None, comm=None):
    """The comparison into `out_dir` (module docstring); -> (rows, table markdown), or
    (None, None) on ranks other than 0. comm: split the work over its ranks (per-image
    streams; module docstring)."""
    from .distributed import SingleProcess, on_root
    from .image_scores import best_per_label, build_evaluator

    cfg.validate()
    if comm is not None and cfg.n < comm.size:       # the same refusal on every rank
        raise ValueError(f"compare: n = {cfg.n} images per model cannot be split over {comm.size} ranks "
                         f"(each needs at least one)")
    log = log or (lambda s: None)
    root = comm is None or comm.is_root
    with on_root(io.output_run(out_dir, log=log), comm or SingleProcess(), out_dir) as out:   # rank 0 writes
        # every checkpoint first: a wrong path or kind fails before the classifier work
        given = [(row, *load_generator(cfg.checkpoints[row], KINDS[row], cfg.use_ema, cfg.backend,
                                       label=f"--{row} checkpoint"))
                 for row in ROWS[1:] if cfg.checkpoints.get(row)]
        ev, clf_path = build_evaluator(cfg.classifier, cfg.data, comm=comm)
        m_real, _ = ev.score(ev.real_heldout, "real held-out images")
        rows = [dict(row="real", metrics=m_real, info=dict(source=cfg.data, split="held-out"),
                     best=best_per_label(ev.real_heldout, ev.real_heldout_logits) if root else None)]
        for row, model, meta, info in given:
            t0 = time.perf_counter()
            x, extra = _draw(comm, model, meta, cfg, row)
            info = dict(checkpoint=info["checkpoint"], architecture=info["model"], ema=info["ema"])
            info.update(extra, sample_seconds=time.perf_counter() - t0)
            if comm is not None:     # the ranks' images, gathered on rank 0, are scored with the ranks' help
                x = comm.bcast(x, f"the {row} images")
            if root:
                io.save_npy(os.path.join(out, f"samples-{row}.npy"), x)
            m, logits = ev.score(x, f"{row} samples", allow_nonnegative=True)   # generated in [-1, 1] by construction
            if not root:
                continue
            rows.append(dict(row=row, metrics=m, info=info, best=best_per_label(x, logits)))
            log(f"{row}: {cfg.n} images in {info['sample_seconds']:.0f}s, mml ratio {m['mml_ratio']:.3f}, "
                f"label entropy {m['label_entropy']:.3f}, fd_features {m['fd_features']:.2f}")
        if not root:
            return None, None
        table = table_markdown(rows, ev.fd_floor)
        io.write_text(os.path.join(out, "table.md"), table)
        io.write_json(os.path.join(out, "table.json"), dict(
            rows=[dict(model=r["row"], **r["metrics"], **r["info"]) for r in rows],
            n=cfg.n, seed=cfg.seed, classifier=os.path.abspath(clf_path), classifier_accuracy=ev.accuracy,
            report_mml=REPORT_MML))
        labels_figure(os.path.join(out, "labels.png"), rows)
        best_figure(os.path.join(out, "best.png"), rows)
    return rows, table
