"""Optimisation: Adam(W), the learning-rate schedule, an exponential moving average of
parameters, gradient clipping, a subset of a model's parameters seen as a model, and the
divergence check.

Learning-rate schedule (`lr_factor`), a pure function of the update's index k = 0, 1, ...
(Adam's step count before the update, saved in the checkpoint, so a resumed run continues
the same schedule), with W = warmup steps and S = the run's total steps:

    warm-up   f = (k + 1) / W                          for k < W (linear, reaching 1 at k = W - 1;
                                                        Goyal et al. 2017 §2.2, as the DDPM recipe)
    constant  f = 1                                    for k >= W
    cosine    f = (1 + cos(pi (k - W) / (S - W))) / 2  for W <= k < S, 0 after (Loshchilov &
                                                        Hutter 2017, SGDR eq. 5 with eta_min = 0,
                                                        one cycle; after the warm-up, as
                                                        transformers' get_cosine_schedule_with_warmup)

and the update uses lr f. warmup = 0 and "constant" give f = 1 exactly (lr * 1.0 == lr: every
run without a schedule is unchanged bit for bit).

The update itself is the op `adam_update` of the model's backend, so the accelerated
backends can fuse it; this module keeps the state and the bookkeeping.

DivergenceGuard (after every update) stops a run that diverged, on any of:
- a non-finite loss;
- a non-finite parameter or Adam moment (m, v). The loss alone is not enough: a huge step
  can leave Inf in the weights after a finite loss, and Adam's v can overflow to Inf
  (g^2 > 3.4e38 in float32) while the loss stays finite: the update m / (sqrt(v) + eps) is
  then 0 and training silently freezes at a diverged loss;
- a loss that exploded: |loss| > LOSS_FACTOR * max(ref, 1), ref being the smallest median of
  |loss| over a window of the last LOSS_WINDOW steps seen so far in this run. A minibatch
  loss of a run that is learning stays within a small factor of its level (the relative
  noise of a mean over B examples is O(1/sqrt(B))); a factor of 1e4 over the best level
  ever reached is far outside that noise, yet far below the losses of diverged runs (1e20
  and more with Adam at lr 1e3). The floor of 1 keeps a loss that has become tiny (a
  classifier at 1e-4) from making ordinary batches look like explosions; the minimum over
  time catches a slow climb as well as a jump.
"""
from __future__ import annotations

import math

import numpy as np


def _check(name, value, lo, hi, lo_open=False, hi_open=False):
    ok = math.isfinite(value) and (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
    if not ok:
        raise ValueError(f"{name} must lie in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}; got {value!r}")


LR_SCHEDULES = ("constant", "cosine")


def lr_factor(step, warmup=0, schedule="constant", total=None):
    """The learning-rate multiplier of update `step` (0-based; see the module docstring)."""
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}; got {schedule!r}")
    if schedule == "cosine" and (total is None or total <= warmup):
        raise ValueError(f"the cosine lr schedule needs the run's total steps > warmup ({warmup}); got {total!r}")
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    if step >= total:
        return 0.0
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / (total - warmup)))


class Adam:
    """Adam with optional decoupled weight decay (AdamW), on a model's params/grads.
    `lr_schedule`: a function of the update's index (0-based) -> lr multiplier (lr_factor),
    or None (constant lr)."""

    def __init__(self, model, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, lr_schedule=None):
        _check("lr", lr, 0, math.inf, lo_open=True, hi_open=True)
        _check("beta1", betas[0], 0, 1, hi_open=True)
        _check("beta2", betas[1], 0, 1, hi_open=True)
        _check("eps", eps, 0, math.inf, lo_open=True, hi_open=True)
        _check("weight_decay", weight_decay, 0, math.inf, hi_open=True)
        self.model = model
        self.lr, self.betas, self.eps, self.weight_decay = float(lr), tuple(map(float, betas)), float(eps), float(weight_decay)
        xp = model.ops.xp
        self.m = {k: xp.zeros_like(p) for k, p in model.params.items()}
        self.v = {k: xp.zeros_like(p) for k, p in model.params.items()}
        self.step_count = 0
        self.lr_schedule = lr_schedule

    def current_lr(self):
        """The lr of the next update."""
        return self.lr if self.lr_schedule is None else self.lr * self.lr_schedule(self.step_count)

    def step(self):
        lr = self.current_lr()
        self.step_count += 1
        upd = self.model.ops.adam_update
        for k, p in self.model.params.items():
            upd(p, self.model.grads[k], self.m[k], self.v[k], lr, self.betas[0], self.betas[1],
                self.eps, self.step_count, self.weight_decay)

    def state(self):
        to = self.model.ops.to_numpy
        out = {"step": np.array(self.step_count)}
        out.update({f"m/{k}": to(a) for k, a in self.m.items()})
        out.update({f"v/{k}": to(a) for k, a in self.v.items()})
        return out

    def load_state(self, state):
        """Restore state() output; KeyError / ValueError if it does not fit these parameters."""
        for k in self.m:
            for name in (f"m/{k}", f"v/{k}"):
                if tuple(state[name].shape) != tuple(self.m[k].shape):
                    raise ValueError(f"optimizer state {name!r} has shape {tuple(state[name].shape)}; "
                                     f"the parameter has {tuple(self.m[k].shape)}")
        self.step_count = int(state["step"])
        for k in self.m:
            self.m[k][...] = self.model.ops.asarray(state[f"m/{k}"])
            self.v[k][...] = self.model.ops.asarray(state[f"v/{k}"])


class EMA:
    """Exponential moving average of parameters: e <- d e + (1 - d) p.

    With warm-up (as tf.train.ExponentialMovingAverage's num_updates): d = min(decay,
    (1 + n) / (10 + n)) at update n, so that a short run is not dominated by the
    initial weights.
    """

    def __init__(self, model, decay=0.999, warmup=True):
        _check("ema decay", decay, 0, 1)
        self.model, self.decay, self.warmup = model, float(decay), bool(warmup)
        self.shadow = {k: p.copy() for k, p in model.params.items()}
        self.num_updates = 0

    def update(self):
        n = self.num_updates
        self.num_updates += 1
        d = min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay
        for k, p in self.model.params.items():
            e = self.shadow[k]
            e *= d
            e += (1 - d) * p

    def state(self):
        out = {k: self.model.ops.to_numpy(v) for k, v in self.shadow.items()}
        out["__num_updates__"] = np.array(self.num_updates)
        return out

    def load_state(self, state):
        for k in self.shadow:
            if tuple(state[k].shape) != tuple(self.shadow[k].shape):
                raise ValueError(f"EMA state {k!r} has shape {tuple(state[k].shape)}; the parameter has "
                                 f"{tuple(self.shadow[k].shape)}")
        self.num_updates = int(state.get("__num_updates__", 0))
        for k in self.shadow:
            self.shadow[k][...] = self.model.ops.asarray(state[k])

    def swap(self):
        """Exchange model parameters and EMA weights (call twice to undo)."""
        for k, p in self.model.params.items():
            tmp = p.copy()
            p[...] = self.shadow[k]
            self.shadow[k][...] = tmp


def clip_grad_norm(model, max_norm):
    """Scale all gradients so that their global L2 norm is at most max_norm; returns the
    norm before clipping (as torch.nn.utils.clip_grad_norm_)."""
    _check("max_norm", max_norm, 0, math.inf, lo_open=True)
    xp = model.ops.xp
    total = math.sqrt(sum(float(xp.sum(g.astype(np.float64) ** 2)) for g in model.grads.values()))
    if not math.isfinite(total):
        raise FloatingPointError(f"gradient norm is {total}: the loss diverged (NaN/Inf gradients)")
    if total > max_norm:
        scale = max_norm / (total + 1e-6)
        for g in model.grads.values():
            g *= scale
    return total


class ParamSubset:
    """The parameters of `model` whose names start with `prefix`, looking like a model to
    Adam (which reads .params, .grads and .ops). Arrays are shared, not copied."""

    def __init__(self, model, prefix):
        self.ops = model.ops
        self.params = {k: v for k, v in model.params.items() if k.startswith(prefix)}
        self.grads = {k: model.grads[k] for k in self.params}
        if not self.params:
            raise ValueError(f"model {model.name!r} has no parameters starting with {prefix!r}")


# --- divergence ----------------------------------------------------------------------------------------
LOSS_FACTOR = 1e4
LOSS_WINDOW = 50


class DivergenceError(FloatingPointError, ValueError):
    """Training diverged. A FloatingPointError (the CLI exits 1, a runtime failure), and a
    ValueError for code that catches the errors of a bad configuration (e.g. a huge lr)."""


def _all_finite(xp, arrays):
    """One device reduction for many arrays: the float64 sum of each is finite iff the array
    is (a float32 array cannot overflow a float64 sum; NaN and Inf propagate)."""
    total = 0.0
    for a in arrays:
        total = total + xp.sum(a, dtype=np.float64)
    return math.isfinite(float(total))


class DivergenceGuard:
    """`check(out)` after every update (see the module docstring); raises FloatingPointError
    saying what diverged. `optimizers`: dict name -> Adam (their m and v are checked)."""

    def __init__(self, model, optimizers=None, factor=LOSS_FACTOR, window=LOSS_WINDOW):
        self.model, self.optimizers = model, dict(optimizers or {})
        self.factor, self.window = float(factor), int(window)
        self.recent, self.ref = [], math.inf

    def _arrays(self):
        yield from (("parameter", k, a) for k, a in self.model.params.items())
        for name, opt in self.optimizers.items():
            yield from ((f"{name} optimizer's first moment (Adam m)", k, a) for k, a in opt.m.items())
            yield from ((f"{name} optimizer's second moment (Adam v)", k, a) for k, a in opt.v.items())

    def check(self, out):
        """out: the step's dict of losses (its "loss" entry is watched) or a float."""
        loss = float(out["loss"] if isinstance(out, dict) else out)
        if isinstance(out, dict):
            bad = [k for k, v in out.items() if not math.isfinite(float(v))]
            if bad:
                raise FloatingPointError(f"{', '.join(bad)} is {out[bad[0]]}")
        elif not math.isfinite(loss):
            raise FloatingPointError(f"loss is {loss}")
        xp = self.model.ops.xp
        if not _all_finite(xp, (a for _, _, a in self._arrays())):
            for what, k, a in self._arrays():
                if not bool(xp.all(xp.isfinite(a))):
                    raise FloatingPointError(f"the update left NaN or Inf in {what} {k!r} (loss {loss:.4g})")
        if len(self.recent) and abs(loss) > self.factor * max(self.ref, 1.0):
            raise FloatingPointError(f"the loss exploded to {loss:.4g}, more than {self.factor:.0e} x the run's "
                                     f"typical level {max(self.ref, 1.0):.4g} (median of |loss| over "
                                     f"{self.window} steps, floor 1)")
        self.recent = (self.recent + [abs(loss)])[-self.window:]
        self.ref = min(self.ref, float(np.median(self.recent)))
