"""Optimisation: Adam(W), an exponential moving average of parameters, gradient clipping.

The update itself is the op `adam_update` of the model's backend, so the accelerated
backends can fuse it; this module keeps the state and the bookkeeping.
"""
from __future__ import annotations

import math

import numpy as np


def _check(name, value, lo, hi, lo_open=False, hi_open=False):
    ok = math.isfinite(value) and (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
    if not ok:
        raise ValueError(f"{name} must lie in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}; got {value!r}")


class Adam:
    """Adam with optional decoupled weight decay (AdamW), on a model's params/grads."""

    def __init__(self, model, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
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

    def step(self):
        self.step_count += 1
        upd = self.model.ops.adam_update
        for k, p in self.model.params.items():
            upd(p, self.model.grads[k], self.m[k], self.v[k], self.lr, self.betas[0], self.betas[1],
                self.eps, self.step_count, self.weight_decay)

    def state(self):
        to = self.model.ops.to_numpy
        out = {"step": np.array(self.step_count)}
        out.update({f"m/{k}": to(a) for k, a in self.m.items()})
        out.update({f"v/{k}": to(a) for k, a in self.v.items()})
        return out

    def load_state(self, state):
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
