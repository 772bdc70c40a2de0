"""Training on images, for every model kind, with checkpoints that resume bit for bit.

`Trainer(config, out_dir, resume)` runs epochs of shuffled minibatches. Everything random
in epoch e (the shuffle, and every draw of the objective) comes from
numpy.random.default_rng([seed, e]), so a run stopped after any epoch and resumed from
its checkpoint gives the same weights, bit for bit, as an uninterrupted run (same
backend and machine). At the end of every epoch it writes, atomically:

    DIR/checkpoint.npz   model spec and weights, EMA, optimizer state(s), epoch, history,
                         the training config, the DDPM schedule, the image shape
    DIR/metrics.json     per epoch: mean of each loss, seconds

The objective is chosen by `model.kind` from refdiff.objectives.OBJECTIVES (the losses
and their optimisers; see that module for what an objective implements).

Before any work the Trainer checks the output directory (created and written to), the
data set (not empty) and the model arguments (none cast silently); `fit` holds the
directory's RunLock (refdiff.io) and, after every step, refdiff.optim.DivergenceGuard checks
the loss, the weights and the optimizer moments: a diverged run stops with DivergenceError
naming the epoch and step, and the checkpoint on disk stays the last finite state (its
arrays are checked again by checkpoint.save before writing).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field

import numpy as np

from . import checkpoint
from .ddpm import model_input_shape
from .distributed import DataParallel, check_same_state, get_comm, on_root, select_gpu
from .io import Progress, RunLock, prepare_output_dir, write_json
from .objectives import OBJECTIVES, get_objective  # noqa: F401 - the registry, also read from here
from .optim import LR_SCHEDULES, DivergenceError, DivergenceGuard
from .prediction import PREDICTIONS

CHECKPOINT, METRICS = "checkpoint.npz", "metrics.json"
# Keys that may change when a run is resumed: the length of the run and where it computes.
RESUMABLE_CHANGES = ("epochs", "backend")
# make_model arguments the config sets itself; model_args may not set them too.
RESERVED_MODEL_ARGS = ("dtype", "seed", "backend")


@dataclass
class TrainConfig:
    data: str = "mnist5k"              # image source (refdiff.data.images): mnist5k | fashion | idx:DIR
    split: str = "train"               # which split of it to train on
    limit: int | None = None           # train on the first `limit` images only (None: all)
    model: str = "unet-seed"           # a name in refdiff.nn.MODELS
    model_args: dict = field(default_factory=dict)   # overrides of the model's defaults
    dtype: str = "float32"             # float32 | float64
    backend: str = "numpy"             # numpy | numba | numba-cuda | cupy (refdiff.backend)
    epochs: int = 82                   # report table 3.1 (DDPM on MNIST)
    batch: int | None = None           # None: the objective's default (eps: 128, table 3.1)
    lr: float | None = None            # None: the objective's default (eps: Adam 1e-4, table 3.1)
    seed: int = 0                      # model init and the per-epoch generators [seed, epoch]
    loss: str = "ddpm"                 # eps-models: "ddpm" or a name in refdiff.losses.LOSSES (VP SDE)
    ema_decay: float = 0.999           # eps-models: EMA of the weights (refdiff.optim.EMA, warm-up)
    grad_clip: float | None = None     # eps-models: clip the global gradient norm (None: off)
    num_steps: int = 1000              # DDPM chain length N (Ho et al. 2020)
    beta_start: float = 1e-4           # DDPM beta_1
    beta_end: float = 0.02             # DDPM beta_N
    schedule: str = "linear"           # linear | cosine (refdiff.sde.DDPMSchedule)
    pred: str = "eps"                  # eps-models, loss ddpm: the prediction target eps | x0 | v (refdiff.prediction)
    label_dropout: float = 0.0         # class-conditional eps-models: P(label -> null label) (Ho & Salimans 2022)
    warmup: int = 0                    # linear lr warm-up over this many steps (refdiff.optim.lr_factor)
    lr_schedule: str = "constant"      # constant | cosine (decay to 0 over epochs x batches per epoch)
    beta_min: float = 0.1              # VP SDE for the continuous losses (Song et al. 2021)
    beta_max: float = 20.0

    def validate(self):
        def bad(name, why):
            raise ValueError(f"train config: {name} {why}; got {getattr(self, name)!r}")

        for name in ("epochs", "num_steps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                bad(name, "must be an integer >= 1")
        for name in ("batch", "limit"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1):
                bad(name, "must be an integer >= 1 (or None)")
        for name in ("lr", "grad_clip"):
            v = getattr(self, name)
            if v is not None and not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                bad(name, "must be a finite number > 0 (or None)")
        if not (isinstance(self.ema_decay, (int, float)) and 0 <= self.ema_decay <= 1):
            bad("ema_decay", "must lie in [0, 1]")
        if self.pred not in PREDICTIONS:
            bad("pred", f"(the prediction target) must be one of {', '.join(PREDICTIONS)}")
        if isinstance(self.label_dropout, bool) or not isinstance(self.label_dropout, (int, float)) \
                or not 0 <= self.label_dropout < 1:
            bad("label_dropout", "must lie in [0, 1)")
        if isinstance(self.warmup, bool) or not isinstance(self.warmup, (int, np.integer)) or self.warmup < 0:
            bad("warmup", "must be an integer >= 0")
        if self.lr_schedule not in LR_SCHEDULES:
            bad("lr_schedule", f"must be one of {', '.join(LR_SCHEDULES)}")
        if self.dtype not in ("float32", "float64"):
            bad("dtype", "must be 'float32' or 'float64'")
        if not isinstance(self.seed, (int, np.integer)) or isinstance(self.seed, bool) or self.seed < 0:
            bad("seed", "must be an integer >= 0")
        if not isinstance(self.model_args, dict):
            bad("model_args", "must be a dict")
        for k in RESERVED_MODEL_ARGS:
            if k in self.model_args:
                raise ValueError(f"train config: model_args may not set {k!r}: it is the config's own {k} "
                                 f"(--{k}); got model_args {self.model_args!r}")
        try:    # as a checkpoint stores it (tuples -> lists), so that resuming compares equal
            self.model_args = json.loads(json.dumps(self.model_args))
        except (TypeError, ValueError):
            bad("model_args", "must hold JSON values (numbers, strings, lists)")
        return self


class _Optimizers:
    """Several named optimizers seen as one by checkpoint.save_model (keys <name>/<key>)."""

    def __init__(self, optimizers):
        self.optimizers = optimizers

    def state(self):
        return {f"{name}/{k}": v for name, opt in self.optimizers.items() for k, v in opt.state().items()}


def _same_value(given, used):
    """True if a model stores `used` for an argument given as `given` without changing it
    (16 and 16.0 are the same width; 16.7 -> 16 and true -> 1 are not)."""
    if given is None:
        return True                        # "the model's default": whatever it chose
    if isinstance(given, bool) or isinstance(used, bool):
        return type(given) is type(used) and given == used
    if isinstance(given, (int, float)) and isinstance(used, (int, float)):
        return given == used
    if isinstance(given, (list, tuple)) and isinstance(used, (list, tuple)):
        return len(given) == len(used) and all(_same_value(a, b) for a, b in zip(given, used))
    if isinstance(given, dict) and isinstance(used, dict):
        return given.keys() == used.keys() and all(_same_value(given[k], used[k]) for k in given)
    return given == used


def _build_model(c, image_shape):
    """The model of config `c` for images of `image_shape`; ValueError if a model_args value
    would be cast to another (widths=[16.7] -> 16, [true] -> 1)."""
    from .nn import make_model

    args = dict(c.model_args)
    if c.model == "mlp" and "dim" not in args:      # the MLP on flattened images
        args["dim"] = int(np.prod(image_shape))
    model = make_model(c.model, dtype=np.dtype(c.dtype), seed=c.seed, backend=c.backend, **args)
    for k, v in c.model_args.items():
        if k in model.config and not _same_value(v, model.config[k]):
            raise ValueError(f"model_args {k}={json.dumps(v)}: model {c.model!r} would use "
                             f"{k}={json.dumps(model.config[k])}; give a value of the type it takes")
    return model


# --- the trainer ----------------------------------------------------------------------------------------
class Trainer:
    """Trains `config` into `out_dir` (see the module docstring).

    Everything that can be checked before the first step is checked here, cheapest first: the
    config, the output directory (created, written to), an existing run there (refused
    unless `resume`), the data set (at least one image), the model arguments (none cast
    silently), the checkpoint to resume. `fit` holds the directory's RunLock while it runs."""

    def __init__(self, config, out_dir, resume=False, log=None, progress_stream=None):
        from .data.images import load_images

        self.config = config.validate() if isinstance(config, TrainConfig) else TrainConfig(**config).validate()
        self.out_dir, self.log = os.fspath(out_dir), log or (lambda s: print(s, file=sys.stderr, flush=True))
        self.progress_stream = progress_stream or sys.stderr
        c = self.config
        self.path = os.path.join(self.out_dir, CHECKPOINT)
        prepare_output_dir(self.out_dir)
        if not resume and os.path.lexists(self.path):
            raise ValueError(f"{self.path!r} exists: pass --resume to continue that run, or choose another --out")
        x, y = load_images(c.data, c.split)
        if c.limit is not None:
            x, y = x[:c.limit], y[:c.limit]
        if len(x) == 0:
            raise ValueError(f"the {c.split!r} split of data set {c.data!r} holds no images: nothing to train on")
        self.x, self.y, self.image_shape = x, y, tuple(x.shape[1:])
        self.comm = get_comm()             # under mpirun: data parallelism (refdiff.distributed)
        if self.comm.size > 1:
            select_gpu(self.comm, c.backend)
        self.model = _build_model(c, self.image_shape)
        if self.model.kind == "eps" and int(np.prod(model_input_shape(self.model))) != int(np.prod(self.image_shape)):
            raise ValueError(f"model {c.model!r} takes inputs of shape {model_input_shape(self.model)}; "
                             f"the images of {c.data!r} have shape {self.image_shape}")
        if self.model.kind != "eps" and (c.pred != "eps" or c.label_dropout):
            raise ValueError(f"pred and label_dropout belong to diffusion models; {c.model!r} is a "
                             f"{self.model.kind!r} model")
        cls = get_objective(self.model.kind)
        self.batch = int(c.batch or getattr(cls, "defaults", {}).get("batch", 128))
        # the lr schedule runs over the whole run: epochs x batches per epoch (the global batch)
        self.total_steps = c.epochs * math.ceil(len(x) / self.batch)
        self.objective = cls(self.model, dict(dataclasses.asdict(c), total_steps=self.total_steps))
        self.dp = DataParallel(self.comm, self.objective, self.model.kind)     # one process: changes nothing
        self.dp.check_split(len(x), self.batch)
        self.epoch, self.history = 0, []
        self.saved_epoch = None            # the epoch of the checkpoint on disk (None: there is none)
        if resume and os.path.lexists(self.path):
            self._resume()
        elif resume:
            self.log(f"no checkpoint at {self.path}: starting a new run")

    # -- checkpoints --------------------------------------------------------------------------------------
    def _meta(self):
        c = self.config
        meta = dict(kind="train", train_config=dataclasses.asdict(c), epoch=self.epoch, history=self.history,
                    rng_seed=c.seed, image_shape=list(self.image_shape), n_train=int(len(self.x)),
                    objective=self.model.kind, batch=self.batch)
        if self.model.kind == "eps":
            meta["ddpm_schedule"] = self.objective.schedule.config()
            meta["sde"] = self.objective.sde.config()
            meta["prediction"] = c.pred            # what the network's output means (refdiff.prediction)
        return meta

    def save(self):
        os.makedirs(self.out_dir, exist_ok=True)
        obj = self.objective
        extra = obj.state() if callable(getattr(obj, "state", None)) else None
        checkpoint.save_model(self.path, self.model, ema=getattr(obj, "ema", None),
                              optimizer=_Optimizers(obj.optimizers()), extra_arrays=extra, **self._meta())
        secs = [h["seconds"] for h in self.history]
        write_json(os.path.join(self.out_dir, METRICS), dict(
            history=self.history, epochs_done=self.epoch, config=dataclasses.asdict(self.config),
            model=self.model.spec(), parameters=self.model.num_parameters(), n_train=int(len(self.x)),
            batch=self.batch, seconds_per_epoch=float(np.mean(secs)) if secs else None))

    def _resume(self):
        arrays, meta = checkpoint.load(self.path)
        old = meta.get("train_config")
        if not isinstance(old, dict) or not isinstance(meta.get("epoch"), int) or isinstance(meta["epoch"], bool) \
                or meta["epoch"] < 0 or not isinstance(meta.get("history", []), list):
            raise checkpoint.CheckpointError(f"cannot resume {self.path!r}: it is not a checkpoint of `refdiff train` "
                                             f"(no train_config, epoch and history)")
        new = dataclasses.asdict(self.config)
        # a key the checkpoint lacks is a setting added after it was written: it ran with the default
        old = {**{f.name: f.default for f in dataclasses.fields(TrainConfig) if f.name not in old
                  and f.default is not dataclasses.MISSING}, **old}
        diff = [k for k in sorted(set(old) | set(new)) if k not in RESUMABLE_CHANGES and old.get(k) != new.get(k)]
        if not diff and new["lr_schedule"] == "cosine" and old.get("epochs") != new["epochs"]:
            raise checkpoint.CheckpointError(
                f"cannot resume {self.path!r} with epochs={new['epochs']}: its cosine lr schedule decays over "
                f"epochs={old.get('epochs')!r}; resume with --epochs {old.get('epochs')} (or train a new run)")
        if diff:
            raise checkpoint.CheckpointError(
                f"cannot resume {self.path!r}: it was trained with a different configuration: " +
                ", ".join(f"{k}={old.get(k)!r} there, {new.get(k)!r} now" for k in diff))
        if meta.get("model") != self.model.spec():
            raise checkpoint.CheckpointError(f"cannot resume {self.path!r}: it holds model {meta.get('model')!r}; "
                                             f"the requested one is {self.model.spec()!r}")
        sec = {s: {k[len(s) + 1:]: v for k, v in arrays.items() if k.startswith(s + "/")}
               for s in ("params", "ema", "optim", "extra")}
        try:
            self.model.load_state(sec["params"])
            ema = getattr(self.objective, "ema", None)
            if ema is not None:
                ema.load_state(sec["ema"])
            for name, opt in self.objective.optimizers().items():
                opt.load_state({k[len(name) + 1:]: v for k, v in sec["optim"].items() if k.startswith(name + "/")})
            if callable(getattr(self.objective, "load_state", None)):
                self.objective.load_state(sec["extra"])
        except (KeyError, ValueError, TypeError) as exc:
            raise checkpoint.CheckpointError(f"cannot resume {self.path!r}: its state does not match "
                                             f"({type(exc).__name__}: {exc})") from None
        self.epoch, self.history = int(meta["epoch"]), list(meta.get("history", []))
        self.saved_epoch = self.epoch
        self.log(f"resuming {self.path} after epoch {self.epoch}")

    # -- training -------------------------------------------------------------------------------------------
    def on_disk(self):
        """Where the last finite state is, for a message about a stopped run."""
        if self.saved_epoch is None:
            return "no checkpoint was written (the run stopped before its first epoch ended)"
        return f"the checkpoint of epoch {self.saved_epoch} is intact in {self.path} (the last finite state)"

    def fit(self):
        """Train up to config.epochs; -> the history (one dict per epoch). Holds the output
        directory's RunLock. After every step the DivergenceGuard checks the loss, the
        parameters and the optimizer moments; a failure raises DivergenceError saying what
        went wrong where and which checkpoint (the last finite state) is on disk."""
        with on_root(RunLock(self.out_dir), self.comm):       # only rank 0 writes
            return self._fit()

    def _fit(self):
        c, F, n = self.config, self.model.ops, len(self.x)
        steps_per_epoch = math.ceil(n / self.batch)
        todo = max(c.epochs - self.epoch, 0)
        progress = Progress(todo * steps_per_epoch, label="train", stream=self.progress_stream)
        guard = DivergenceGuard(self.model, self.objective.optimizers())
        done, t_run = 0, time.perf_counter()
        for e in range(self.epoch, c.epochs):
            rng = np.random.default_rng([c.seed, e])
            order = rng.permutation(n)
            sums, seen, t0 = {}, 0, time.perf_counter()
            for s in range(steps_per_epoch):
                # this rank's share of the global batch, and the generator that draws its noise
                idx, step_rng = self.dp.shard(order[s * self.batch:(s + 1) * self.batch], rng)
                try:
                    out = self.objective.step(F.asarray(self.x[idx].astype(self.model.dtype)), self.y[idx], step_rng)
                    guard.check(out)
                except FloatingPointError as exc:
                    raise DivergenceError(f"training diverged at epoch {e + 1}, step {s + 1}: {exc}; "
                                          f"{self.on_disk()}; lower --lr or set --grad-clip") from None
                for k, v in out.items():
                    sums[k] = sums.get(k, 0.0) + float(v) * len(idx)
                done, seen = done + 1, seen + len(idx)
                progress.update(done, epoch=f"{e + 1}/{c.epochs}", step=f"{s + 1}/{steps_per_epoch}",
                                loss=sums["loss"] / seen,
                                img_s=done * self.batch / max(time.perf_counter() - t_run, 1e-9))
            if self.comm.size > 1:        # the epoch's metrics over all ranks; all must hold the same state
                sums = self.dp.sum_metrics(sums)
                check_same_state(self.comm, self.model, self.objective, where=f"after epoch {e + 1}")
            self.epoch = e + 1
            self.history.append(dict(epoch=self.epoch, seconds=time.perf_counter() - t0,
                                     **{k: v / n for k, v in sums.items()}))
            if self.comm.is_root:
                self.save()
            self.saved_epoch = self.epoch
        return self.history
