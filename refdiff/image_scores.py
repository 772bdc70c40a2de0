"""Classifier-based scores for generated MNIST images (report §3.4.3, done as it meant).

For a set of images x (N, 1, 28, 28) in [-1, 1] and the MNIST CNN of refdiff.nn.classifier:

    mml             mean over images of max_k logit_k(x)           (the report's "mean max logit")
    mml_ratio       mml / mml of the real held-out images           (1 = as confident as on real digits)
    label_hist      counts of argmax_k logit_k(x), k = 0..9         (the report's fig. 3.4)
    label_entropy   -sum_k p_k ln p_k of that histogram             (ln 10 = 2.303: all labels equally)
    fd_features     Fréchet distance (report def. 2.5.2) between Gaussians fitted to the
                    classifier's 128-d penultimate features of x and of the real training
                    split: an FID whose feature extractor suits MNIST (Inception does not)
    fd_features_real_vs_real   the same distance from the held-out split to the training
                    split: the floor a perfect generator reaches with as many images as the
                    held-out split has (1,000 for mnist5k; FD estimates are biased upward at
                    small N, so compare sets of equal size: 1,000 generated images by default)

What the report did wrong and this module refuses to do (report §3.4.3, table 3.2 and fig. 3.5): it scored 100 images,
and min-max normalised the DDPM's images one by one but not the other models'. Here every
set must already be in [-1, 1] (checked, never rescaled), and the default is 1,000 images.

Per class (`per_class_scores`), when each image comes with the class it was asked for
(labels.npy of `refdiff sample --class`): for every class k asked for, n_k the images asked for
k, accuracy_k the share of them the classifier labels k, and fd_features_k the Fréchet
distance of their features to those of the real held-out digits of class k (about 100 per
class in mnist5k: fewer than the 128 features, so the estimate is biased upward; compare
classes and models with each other at equal n_k, not with the all-class numbers); and
class_accuracy, the share of all images labelled as asked. No per-class floor is given: the
only other real digits of class k are training digits, whose features the classifier was fit
to; a distance from them is not what unseen real digits of class k would score.

Under mpirun (`comm` of refdiff.distributed with several ranks) the classifier's passes over
the images (generated and real) are split by image index over the ranks and gathered on rank
0, which alone computes the scores, in one process's order: N ranks give one process's
numbers, up to the rounding of the classifier's matrix products on batches of another size
(tests/test_mpi_evaluate.py; docs/distributed.md).

The classifier is trained once and cached (`default_classifier_path`); `load_or_train_classifier`
trains it on first use and says so (under mpirun, on rank 0 alone: `shared_classifier`).
"""
from __future__ import annotations

import os
import re
import sys
import time
import warnings

import numpy as np

from .metrics import frechet_from_moments

NUM_CLASSES = 10
IMAGE = (1, 28, 28)
DEFAULT_N = 1000
RANGE_TOL = 1e-3   # float32 rounding of tanh/clip outputs; anything further out is a range error


# --- input checks ---------------------------------------------------------------------------------
def check_images(x, name="images", min_n=2, allow_nonnegative=False):
    """x (N, 1, 28, 28) finite, in [-1, 1] (within RANGE_TOL, then clipped) -> float32 copy.

    min_n = 2: a covariance needs two images (and the Fréchet distance a covariance).
    A set with no negative pixel is refused as a likely [0, 1] set (MNIST's background is
    -1) unless allow_nonnegative (images a model generated in [-1, 1] that happen to be)."""
    x = np.asarray(x)
    if x.ndim != 4 or tuple(x.shape[1:]) != IMAGE:
        raise ValueError(f"{name} must have shape (N, 1, 28, 28); got {x.shape}")
    if x.shape[0] < min_n:
        raise ValueError(f"{name}: need at least {min_n} images (a covariance of features needs 2); got {x.shape[0]}")
    if not np.issubdtype(x.dtype, np.number) or np.issubdtype(x.dtype, np.complexfloating):
        raise ValueError(f"{name} must be real numbers; got dtype {x.dtype}")
    x = x.astype(np.float32)
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name} contain {int(np.sum(~np.isfinite(x)))} NaN or Inf pixel values")
    lo, hi = float(x.min()), float(x.max())
    if lo < -1 - RANGE_TOL or hi > 1 + RANGE_TOL:
        raise ValueError(f"{name}: pixel values must lie in [-1, 1]; got [{lo:.4g}, {hi:.4g}] "
                         f"(map [0, 1] with 2x-1, [0, 255] with x/127.5-1, or clip; never min-max "
                         f"normalise one model's images only)")
    if lo >= 0 and not allow_nonnegative:
        raise ValueError(f"{name}: no pixel is below 0 (range [{lo:.4g}, {hi:.4g}]): these look like "
                         f"[0, 1] images; refdiff images are in [-1, 1] with background -1 (map with 2x-1)")
    return np.clip(x, -1, 1)


def label_entropy(hist):
    """Entropy in nats of the normalised histogram; 0 for one label, ln 10 for uniform."""
    p = np.asarray(hist, dtype=np.float64)
    p = p[p > 0] / p.sum()
    return float(-np.sum(p * np.log(p)) + 0.0)


def _moments(f):
    return f.mean(axis=0), np.atleast_2d(np.cov(f, rowvar=False))


# --- the evaluator -----------------------------------------------------------------------------------
class Evaluator:
    """Scores image sets against real-image statistics computed once at construction.

    classifier: a refdiff.nn.classifier.Classifier; real_train, real_heldout: (N, 1, 28, 28)
    images in [-1, 1]; heldout_labels (N,) for the classifier's accuracy and the per-class
    scores (optional). comm: a refdiff.distributed communicator: the passes over the images
    are split over its ranks, and only rank 0 holds the statistics and gets scores."""

    def __init__(self, classifier, real_train, real_heldout, heldout_labels=None, batch=500, comm=None):
        from .distributed import SingleProcess

        if getattr(classifier, "kind", None) != "classifier":
            raise ValueError(f"Evaluator needs a classifier model; got {getattr(classifier, 'name', classifier)!r}")
        self.clf, self.batch, self.comm = classifier, int(batch), comm or SingleProcess()
        real_train = check_images(real_train, "real training images")
        real_heldout = check_images(real_heldout, "real held-out images")
        self.n_train, self.n_heldout = len(real_train), len(real_heldout)
        train = self.split_logits_features(real_train, "the real training images")
        heldout = self.split_logits_features(real_heldout, "the real held-out images")
        self.real_heldout = real_heldout
        if not self.comm.is_root:         # rank 0 alone holds the statistics
            return
        (_, ft), (lh, fh) = train, heldout
        self.feats_train, self.feats_heldout = ft, fh
        self.heldout_labels = None if heldout_labels is None else np.asarray(heldout_labels)
        self.mml_real = float(lh.max(axis=1).mean())
        self.mu_train, self.cov_train = _moments(ft)
        self.fd_floor = frechet_from_moments(*_moments(fh), self.mu_train, self.cov_train)
        self.accuracy = None
        if heldout_labels is not None:
            self.accuracy = float(np.mean(lh.argmax(axis=1) == np.asarray(heldout_labels)))
        self.real_heldout_logits = lh

    def logits_features(self, x):
        """-> logits (N, 10), features (N, 128), float64 host arrays, computed in batches."""
        F = self.clf.ops
        out_l, out_f = [], []
        for i in range(0, x.shape[0], self.batch):
            lg, ft = self.clf.logits_and_features(F.asarray(x[i:i + self.batch].astype(self.clf.dtype)))
            out_l.append(F.to_numpy(lg).astype(np.float64))
            out_f.append(F.to_numpy(ft).astype(np.float64))
        return np.concatenate(out_l), np.concatenate(out_f)

    def split_logits_features(self, x, what):
        """logits_features of x with the images split over the ranks: on rank 0 all of them,
        in order; None on the others."""
        from .distributed import split_rows

        return split_rows(self.comm, lambda lo, hi: self.logits_features(x[lo:hi]), len(x),
                          f"the classifier's pass over {what}")

    def score(self, x, name="images", allow_nonnegative=False, labels=None):
        """The metrics of the module docstring for x (N, 1, 28, 28); labels (N,): the class
        each image was asked for, adds per_class_scores' entries. -> (metrics dict, logits);
        (None, None) on ranks other than 0."""
        x = check_images(x, name, allow_nonnegative=allow_nonnegative)
        if labels is not None:
            labels = check_labels(labels, len(x), f"labels of {name}")
        out = self.split_logits_features(x, name)
        if not self.comm.is_root:
            return None, None
        logits, feats = out
        if x.shape[0] <= feats.shape[1]:
            warnings.warn(f"{name}: {x.shape[0]} images for {feats.shape[1]}-d features: the feature "
                          f"covariance is singular and fd_features is biased upward; use >= {DEFAULT_N}",
                          stacklevel=2)
        mml = float(logits.max(axis=1).mean())
        hist = np.bincount(logits.argmax(axis=1), minlength=NUM_CLASSES)
        metrics = {
            "n": int(x.shape[0]),
            "mml": mml,
            "mml_ratio": mml / self.mml_real,
            "mml_real_heldout": self.mml_real,
            "label_hist": [int(c) for c in hist],
            "label_entropy": label_entropy(hist),
            "fd_features": frechet_from_moments(*_moments(feats), self.mu_train, self.cov_train),
            "fd_features_real_vs_real": self.fd_floor,
            "classifier_accuracy": self.accuracy,
        }
        if labels is not None:
            if self.heldout_labels is None:
                raise ValueError("per-class scores need the held-out images' labels (Evaluator(heldout_labels=...))")
            metrics.update(per_class_scores(logits, feats, labels, self.feats_heldout, self.heldout_labels))
        return metrics, logits


def check_labels(labels, n, name="labels"):
    """labels (n,) integers in 0..NUM_CLASSES-1 (the class asked for each image) -> int64 copy."""
    y = np.asarray(labels)
    if y.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},), one class per image; got {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{name} must be integers (the classes asked for); got dtype {y.dtype}")
    if n and (y.min() < 0 or y.max() >= NUM_CLASSES):
        raise ValueError(f"{name} must lie in 0..{NUM_CLASSES - 1}; got values in [{y.min()}, {y.max()}]")
    return y.astype(np.int64)


def per_class_scores(logits, feats, labels, real_feats, real_labels):
    """Per-class scores of images asked for classes `labels` (module docstring).

    logits (N, 10), feats (N, D) of the images; labels (N,) the classes asked for; real_feats
    (M, D), real_labels (M,) the reference digits (held-out). -> dict(class_accuracy: share
    of all N labelled as asked, per_class: [dict(label k, n, accuracy, fd_features), for each
    k asked for, ascending]). A distance needs 2 images of the class on each side (a
    covariance), else it is None."""
    labels, real_labels = np.asarray(labels), np.asarray(real_labels)
    pred = np.asarray(logits).argmax(axis=1)

    def fd(a, b):
        return frechet_from_moments(*_moments(a), *_moments(b)) if min(len(a), len(b)) >= 2 else None

    rows = []
    for k in np.unique(labels):
        mine, real = feats[labels == k], real_feats[real_labels == k]
        rows.append(dict(label=int(k), n=int(len(mine)), accuracy=float(np.mean(pred[labels == k] == k)),
                         fd_features=fd(mine, real)))
    return dict(class_accuracy=float(np.mean(pred == labels)), per_class=rows)


def best_per_label(x, logits):
    """For each label k, the image predicted as k with the largest max logit, or None
    (the report's fig. 3.5). -> list of NUM_CLASSES (image (28, 28) or None, max logit or None)."""
    pred, top = logits.argmax(axis=1), logits.max(axis=1)
    out = []
    for k in range(NUM_CLASSES):
        idx = np.flatnonzero(pred == k)
        if idx.size == 0:
            out.append((None, None))
        else:
            i = idx[np.argmax(top[idx])]
            out.append((x[i, 0], float(top[i])))
    return out


# --- the cached classifier -----------------------------------------------------------------------------
def cache_dir():
    """$REFDIFF_CACHE, else ~/.cache/refdiff."""
    return os.environ.get("REFDIFF_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "refdiff")


def default_classifier_path(source="mnist5k"):
    return os.path.join(cache_dir(), "classifier-" + re.sub(r"[^A-Za-z0-9]+", "_", source).strip("_") + ".npz")


def load_real(source="mnist5k"):
    """-> (x_train, y_train, x_heldout, y_heldout) from refdiff.data.images."""
    from .data.images import load_images
    x_tr, y_tr = load_images(source, "train")
    x_te, y_te = load_images(source, "heldout")
    return x_tr, y_tr, x_te, y_te


def train_classifier(path, source="mnist5k", epochs=10, seed=0, shift=2, batch=64, lr=1e-3,
                     log=None, data=None):
    """Train the CNN (the recipe of the report's code, plus `shift`-pixel random translations and weight
    averaging, see refdiff.nn.classifier) and save it to `path` as a refdiff checkpoint whose
    params are the averaged weights. -> (model holding them, info dict). `data` = load_real's
    tuple, to reuse already loaded images; `log(str)` receives one line per epoch."""
    from .checkpoint import save_model
    from .nn import make_model
    from .objectives import ClassifierObjective

    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    x_tr, y_tr, x_te, y_te = data if data is not None else load_real(source)
    x_tr, x_te = check_images(x_tr, "training images"), check_images(x_te, "held-out images")
    model = make_model("classifier", seed=seed)
    obj = ClassifierObjective(model, dict(lr=lr, batch=batch, epochs=epochs, shift=shift))
    rng = np.random.default_rng(seed + 1)
    t0 = time.perf_counter()
    accuracy = lambda: float(np.mean(model.ops.to_numpy(model.predict(model.ops.asarray(x_te))).argmax(1)
                                     == np.asarray(y_te)))
    for ep in range(int(epochs)):
        order = rng.permutation(len(x_tr))
        losses = [obj.step(x_tr[order[i:i + batch]], np.asarray(y_tr)[order[i:i + batch]], rng)["loss"]
                  for i in range(0, len(order), batch)]
        raw = accuracy()
        obj.ema.swap()                       # the averaged weights are the classifier's
        acc = accuracy()
        obj.ema.swap()
        log(f"classifier epoch {ep + 1}/{epochs}: loss {np.mean(losses):.4f}, held-out accuracy {acc:.4f} "
            f"(EMA weights; last weights {raw:.4f}), {time.perf_counter() - t0:.0f}s")
    info = dict(kind="classifier", data=source, epochs=int(epochs), seed=int(seed), shift=int(shift), batch=int(batch),
                lr=float(lr), classifier_accuracy=acc, classifier_accuracy_last_weights=raw,
                train_seconds=time.perf_counter() - t0)
    obj.ema.swap()
    save_model(path, model, **info)          # params = the EMA weights
    return model, info


def load_or_train_classifier(path=None, source="mnist5k", log=None, data=None, **train_kw):
    """`path` given: load it (it must exist and hold a classifier). None: the cached default,
    trained there on first use. -> (model, path)."""
    from .checkpoint import load_model

    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    if path is not None:
        if not os.path.exists(path):
            raise FileNotFoundError(f"classifier checkpoint {path!r} does not exist")
        return load_model(path, expect="classifier", use_ema=True)[0], path
    path = default_classifier_path(source)
    if os.path.exists(path):
        return load_model(path, expect="classifier", use_ema=True)[0], path
    log(f"no classifier at {path}: training one on {source} (10 epochs; a few minutes on 2 cores; "
        f"it is cached for later runs, set REFDIFF_CACHE to move the cache)")
    model, _ = train_classifier(path, source, log=log, data=data, **train_kw)
    return model, path


def shared_classifier(comm, path=None, source="mnist5k", log=None, data=None, **train_kw):
    """load_or_train_classifier on rank 0 alone, its weights broadcast to every rank (one
    training, never N). A `path` given is checked on every rank first (a missing file is the
    same error everywhere); the other ranks wait untimed while rank 0 trains. train_kw go to
    train_classifier. -> (model, path)."""
    from .distributed import root_then_bcast

    if comm.size == 1:
        return load_or_train_classifier(path, source, log=log, data=data, **train_kw)
    if path is not None and not os.path.exists(path):
        raise FileNotFoundError(f"classifier checkpoint {path!r} does not exist")
    trains = comm.bcast(path is None and not os.path.exists(default_classifier_path(source)) if comm.is_root
                        else None, "the classifier cache's state")

    mine = {}

    def get():
        mine["model"], got = load_or_train_classifier(path, source, log=log, data=data, **train_kw)
        return mine["model"].spec(), mine["model"].state(), got

    spec, state, got = root_then_bcast(comm, get, "the classifier", untimed=trains)
    return (mine["model"] if comm.is_root else load_model_from_state(spec, state)), got


def load_model_from_state(spec, state):
    """A model rebuilt from its spec and state (what a checkpoint holds)."""
    from .nn import model_from_spec

    model = model_from_spec(spec)
    model.load_state(state)
    return model


def build_evaluator(classifier_path=None, source="mnist5k", log=None, comm=None):
    """Load the real images once, get the classifier (cached or trained), -> (Evaluator, path).
    comm: split the classifier's passes over its ranks (Evaluator); the classifier is trained,
    if it must be, by rank 0 alone (shared_classifier)."""
    from .distributed import SingleProcess

    comm = comm or SingleProcess()
    data = load_real(source)
    clf, path = shared_classifier(comm, classifier_path, source, log=log, data=data)
    return Evaluator(clf, data[0], data[2], data[3], comm=comm), path


# --- a file of images, scored ----------------------------------------------------------------------------
def load_samples(path, what="samples file"):
    """A .npy file of images -> the array (checked by check_images when scored); `what`
    names the file in messages."""
    if not os.path.lexists(path):
        raise FileNotFoundError(f"{what} {path!r} does not exist")
    try:
        x = np.load(path, allow_pickle=False)
    except Exception as exc:       # noqa: BLE001 - a corrupt .npy fails in numpy's parser in many ways
        raise ValueError(f"{what} {path!r} is not a readable .npy array ({type(exc).__name__}: {exc})") from None
    if not isinstance(x, np.ndarray):
        x.close()
        raise ValueError(f"{what} {path!r} holds several arrays (.npz); give one .npy array")
    return x


LABELS_FILE = "labels.npy"      # written by `refdiff sample --class` next to samples.npy


def labels_path(samples, labels="auto"):
    """Where the classes asked for come from: "auto" -> LABELS_FILE next to `samples` if it
    exists, else None; None or "none" -> None; anything else is a path that must exist."""
    if labels is None or labels == "none":
        return None
    if labels == "auto":
        p = os.path.join(os.path.dirname(os.path.abspath(samples)), LABELS_FILE)
        return p if os.path.exists(p) else None
    if not os.path.lexists(labels):
        raise FileNotFoundError(f"labels file {labels!r} does not exist")
    return labels


def score_file(samples, out_dir, classifier=None, source="mnist5k", log=None, labels="auto", comm=None):
    """Score the images in the .npy file `samples` and write out_dir/metrics.json (holding
    the directory's RunLock); -> the metrics (Evaluator.score's, plus the file names).
    labels: see labels_path; with a labels file, the per-class scores too. comm: a
    refdiff.distributed communicator whose ranks share the classifier's work; rank 0 alone
    writes, the others return None."""
    from . import io
    from .distributed import SingleProcess, on_root

    comm = comm or SingleProcess()
    with on_root(io.output_run(out_dir, log=log), comm, out_dir) as out:
        # every input checked on every rank (the same error everywhere), before any training
        x = check_images(load_samples(samples), f"samples in {samples!r}")
        lpath = labels_path(samples, labels)
        y = None
        if lpath is not None:
            y = check_labels(load_samples(lpath, "labels file"), len(x), f"labels in {lpath!r}")
            if log is not None:
                log(f"per-class scores: the classes asked for are in {lpath}")
        if len(x) < comm.size:
            raise ValueError(f"{len(x)} images cannot be split over {comm.size} ranks: run with at most "
                             f"{len(x)} ranks (mpirun -n)")
        ev, clf_path = build_evaluator(classifier, source, log=log, comm=comm)
        metrics, _ = ev.score(x, "samples", labels=y)
        if not comm.is_root:
            return None
        metrics.update(samples=os.path.abspath(samples), classifier=os.path.abspath(clf_path), data=source,
                       labels=None if lpath is None else os.path.abspath(lpath), ranks=comm.size)
        io.write_json(os.path.join(out, "metrics.json"), metrics)
    return metrics
