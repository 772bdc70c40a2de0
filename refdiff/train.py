"""Training on images, for every model kind, with checkpoints that resume bit for bit.

`Trainer(config, out_dir, resume)` runs epochs of shuffled minibatches. Everything random
in epoch e (the shuffle, and every draw of the objective) comes from
numpy.random.default_rng([seed, e]), so a run stopped after any epoch and resumed from
its checkpoint gives the same weights, bit for bit, as an uninterrupted run (same
backend and machine). At the end of every epoch it writes, atomically:

    DIR/checkpoint.npz   model spec and weights, EMA, optimizer state(s), epoch, history,
                         the training config, the DDPM schedule, the image shape
    DIR/metrics.json     per epoch: mean of each loss, seconds

The objective is chosen by `model.kind` from OBJECTIVES, "module:attr" strings imported
on use, so each model's file holds its own objective. An objective implements:

    __init__(model, config)   config: dict(TrainConfig); read the keys you use, None
                              meaning "your default"
    defaults                  dict; its "batch" is used when config["batch"] is None
    optimizers()              dict name -> refdiff.optim.Adam, the same objects every call
                              (saved as optim/<name>/..., restored on resume)
    step(x, y, rng)           one update on x (B, C, H, W), a backend array in the model's
                              dtype, and labels y (B,) int64 (host); every random draw from
                              `rng`; -> dict name -> float, with a "loss" entry
    ema (optional)            a refdiff.optim.EMA updated by step(); saved under ema/, and
                              what `refdiff sample` uses unless --no-ema
    state() / load_state(d)   (optional) any other arrays a resume needs
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field

import numpy as np

from . import checkpoint
from .ddpm import ddpm_loss, model_input_shape
from .optim import EMA, Adam, clip_grad_norm
from .sde import VP, DDPMSchedule

OBJECTIVES = {
    "eps": "refdiff.train:EpsObjective",
    "vae": "refdiff.nn.vae:VAEObjective",
    "gan": "refdiff.nn.gan:GANObjective",
    "classifier": "refdiff.nn.classifier:ClassifierObjective",
}
CHECKPOINT, METRICS = "checkpoint.npz", "metrics.json"
# Keys that may change when a run is resumed: the length of the run and where it computes.
RESUMABLE_CHANGES = ("epochs", "backend")


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
        if self.dtype not in ("float32", "float64"):
            bad("dtype", "must be 'float32' or 'float64'")
        if not isinstance(self.seed, (int, np.integer)) or isinstance(self.seed, bool) or self.seed < 0:
            bad("seed", "must be an integer >= 0")
        if not isinstance(self.model_args, dict):
            bad("model_args", "must be a dict")
        try:    # as a checkpoint stores it (tuples -> lists), so that resuming compares equal
            self.model_args = json.loads(json.dumps(self.model_args))
        except (TypeError, ValueError):
            bad("model_args", "must hold JSON values (numbers, strings, lists)")
        return self


# --- objectives -----------------------------------------------------------------------------------
def get_objective(kind):
    """The objective class registered for a model kind."""
    if kind not in OBJECTIVES:
        raise ValueError(f"no training objective for models of kind {kind!r}; known: {sorted(OBJECTIVES)}")
    module, attr = OBJECTIVES[kind].split(":")
    return getattr(importlib.import_module(module), attr)


class EpsObjective:
    """Noise prediction. loss "ddpm": Ho et al.'s simple loss on the discrete chain
    (refdiff.ddpm.ddpm_loss, mean over pixels); any name in refdiff.losses.LOSSES ("dsm",
    "ssm", ...): that continuous loss on VP(beta_min, beta_max) (its own scale: a sum over
    pixels). Adam, optional global-norm clipping, then the EMA update."""

    defaults = dict(lr=1e-4, batch=128, loss="ddpm", ema_decay=0.999, grad_clip=None)

    def __init__(self, model, config=None):
        from .losses import LOSSES

        config = dict(config or {})
        c = dict(self.defaults, **{k: config[k] for k in self.defaults if config.get(k) is not None})
        if getattr(model, "kind", None) != "eps":
            raise ValueError(f"EpsObjective needs a noise-prediction model (kind 'eps'); got {model.kind!r}")
        if c["loss"] != "ddpm" and c["loss"] not in LOSSES:
            raise ValueError(f"loss must be 'ddpm' or one of {sorted(LOSSES)}; got {c['loss']!r}")
        self.model, self.config = model, c
        self.loss_fn = None if c["loss"] == "ddpm" else LOSSES[c["loss"]]
        sched = {k: config[k] for k in ("num_steps", "beta_start", "beta_end") if config.get(k) is not None}
        self.schedule = DDPMSchedule(kind=config.get("schedule") or "linear", **sched)
        self.sde = VP(config.get("beta_min") or 0.1, config.get("beta_max") or 20.0)
        self.input_shape = model_input_shape(model)
        self.ema = EMA(model, decay=c["ema_decay"])
        self._opt = {"model": Adam(model, lr=c["lr"])}

    def optimizers(self):
        return self._opt

    def step(self, x, y, rng):
        m = self.model
        x0 = np.asarray(m.ops.to_numpy(x)).reshape((x.shape[0],) + self.input_shape)
        m.zero_grad()
        if self.loss_fn is None:
            loss = ddpm_loss(m, self.schedule, x0, rng)
        else:
            loss = self.loss_fn(m, self.sde, x0, rng)
        if self.config["grad_clip"] is not None and math.isfinite(loss):
            clip_grad_norm(m, self.config["grad_clip"])
        if math.isfinite(loss):               # a NaN loss is reported by the Trainer, no update
            self._opt["model"].step()
            self.ema.update()
        return {"loss": loss}


class _Optimizers:
    """Several named optimizers seen as one by checkpoint.save_model (keys <name>/<key>)."""

    def __init__(self, optimizers):
        self.optimizers = optimizers

    def state(self):
        return {f"{name}/{k}": v for name, opt in self.optimizers.items() for k, v in opt.state().items()}


# --- the trainer ----------------------------------------------------------------------------------------
class Trainer:
    def __init__(self, config, out_dir, resume=False, log=None, progress_stream=None):
        from .data.images import load_images
        from .nn import make_model

        self.config = config.validate() if isinstance(config, TrainConfig) else TrainConfig(**config).validate()
        self.out_dir, self.log = os.fspath(out_dir), log or (lambda s: print(s, file=sys.stderr, flush=True))
        self.progress_stream = progress_stream or sys.stderr
        c = self.config
        x, y = load_images(c.data, c.split)
        if c.limit is not None:
            x, y = x[:c.limit], y[:c.limit]
        self.x, self.y, self.image_shape = x, y, tuple(x.shape[1:])
        args = dict(c.model_args)
        if c.model == "mlp" and "dim" not in args:      # the MLP on flattened images
            args["dim"] = int(np.prod(self.image_shape))
        self.model = make_model(c.model, dtype=np.dtype(c.dtype), seed=c.seed, backend=c.backend, **args)
        if self.model.kind == "eps" and int(np.prod(model_input_shape(self.model))) != int(np.prod(self.image_shape)):
            raise ValueError(f"model {c.model!r} takes inputs of shape {model_input_shape(self.model)}; "
                             f"the images of {c.data!r} have shape {self.image_shape}")
        self.objective = get_objective(self.model.kind)(self.model, dataclasses.asdict(c))
        self.batch = int(c.batch or getattr(self.objective, "defaults", {}).get("batch", 128))
        self.epoch, self.history = 0, []
        self.path = os.path.join(self.out_dir, CHECKPOINT)
        if resume and os.path.exists(self.path):
            self._resume()
        elif resume:
            self.log(f"no checkpoint at {self.path}: starting a new run")
        elif os.path.exists(self.path):
            raise ValueError(f"{self.path!r} exists: pass --resume to continue that run, or choose another --out")

    # -- checkpoints --------------------------------------------------------------------------------------
    def _meta(self):
        c = self.config
        meta = dict(kind="train", train_config=dataclasses.asdict(c), epoch=self.epoch, history=self.history,
                    rng_seed=c.seed, image_shape=list(self.image_shape), n_train=int(len(self.x)),
                    objective=self.model.kind, batch=self.batch)
        if self.model.kind == "eps":
            meta["ddpm_schedule"] = self.objective.schedule.config()
            meta["sde"] = self.objective.sde.config()
        return meta

    def save(self):
        os.makedirs(self.out_dir, exist_ok=True)
        obj = self.objective
        extra = obj.state() if callable(getattr(obj, "state", None)) else None
        checkpoint.save_model(self.path, self.model, ema=getattr(obj, "ema", None),
                              optimizer=_Optimizers(obj.optimizers()), extra_arrays=extra, **self._meta())
        from .commands.common import write_json
        secs = [h["seconds"] for h in self.history]
        write_json(os.path.join(self.out_dir, METRICS), dict(
            history=self.history, epochs_done=self.epoch, config=dataclasses.asdict(self.config),
            model=self.model.spec(), parameters=self.model.num_parameters(), n_train=int(len(self.x)),
            batch=self.batch, seconds_per_epoch=float(np.mean(secs)) if secs else None))

    def _resume(self):
        arrays, meta = checkpoint.load(self.path)
        old = meta.get("train_config") or {}
        new = dataclasses.asdict(self.config)
        diff = [k for k in sorted(set(old) | set(new)) if k not in RESUMABLE_CHANGES and old.get(k) != new.get(k)]
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
        except (KeyError, ValueError) as exc:
            raise checkpoint.CheckpointError(f"cannot resume {self.path!r}: its state does not match "
                                             f"({type(exc).__name__}: {exc})") from None
        self.epoch, self.history = int(meta["epoch"]), list(meta.get("history", []))
        self.log(f"resuming {self.path} after epoch {self.epoch}")

    # -- training -------------------------------------------------------------------------------------------
    def fit(self):
        """Train up to config.epochs; -> the history (one dict per epoch)."""
        from .commands.common import Progress

        c, F, n = self.config, self.model.ops, len(self.x)
        steps_per_epoch = math.ceil(n / self.batch)
        todo = max(c.epochs - self.epoch, 0)
        progress = Progress(todo * steps_per_epoch, label="train", stream=self.progress_stream)
        done, t_run = 0, time.perf_counter()
        for e in range(self.epoch, c.epochs):
            rng = np.random.default_rng([c.seed, e])
            order = rng.permutation(n)
            sums, t0 = {}, time.perf_counter()
            for s in range(steps_per_epoch):
                idx = order[s * self.batch:(s + 1) * self.batch]
                out = self.objective.step(F.asarray(self.x[idx].astype(self.model.dtype)), self.y[idx], rng)
                if not all(math.isfinite(v) for v in out.values()):
                    raise ValueError(f"training diverged at epoch {e + 1}, step {s + 1}: {out}; the checkpoint of "
                                     f"epoch {self.epoch} is intact (lower the learning rate or set grad_clip)")
                for k, v in out.items():
                    sums[k] = sums.get(k, 0.0) + float(v) * len(idx)
                done += 1
                progress.update(done, epoch=f"{e + 1}/{c.epochs}", step=f"{s + 1}/{steps_per_epoch}",
                                loss=sums["loss"] / min((s + 1) * self.batch, n),
                                img_s=done * self.batch / max(time.perf_counter() - t_run, 1e-9))
            self.epoch = e + 1
            self.history.append(dict(epoch=self.epoch, seconds=time.perf_counter() - t0,
                                     **{k: v / n for k, v in sums.items()}))
            self.save()
        return self.history
