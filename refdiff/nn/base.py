"""Model base class: parameters, gradients, config; no hidden state beyond the caches
that `backward` needs.

A model offers `forward(x, t) -> y`, `backward(dy) -> dx` (accumulating into `grads`),
`zero_grad()`. `params` and `grads` are dicts name -> array with the same keys; arrays
live on the backend's device (`self.ops.xp`).
"""
from __future__ import annotations

import math

import numpy as np

from ..backend import get_ops


def predictor(model):
    """What a sampler evaluates `model` with: its inference forward `predict` (the same
    output as forward, nothing kept for a backward: the UNets' fused path) where it has one,
    else `forward`."""
    return getattr(model, "predict", None) or model.forward


class Model:
    """Subclasses call `super().__init__(...)`, then `self.add_param(...)` for each array."""

    kind = "model"

    def __init__(self, name, config, dtype=np.float32, seed=0, backend=None):
        self.name = name
        self.config = dict(config)
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.float32, np.float64):
            raise ValueError(f"dtype must be float32 or float64; got {self.dtype}")
        self.seed = seed
        self.ops = get_ops(backend)
        self.rng = np.random.default_rng(seed)   # used for initialisation only
        self.params, self.grads = {}, {}

    # -- parameters ----------------------------------------------------------------------
    def add_param(self, name, value):
        value = np.asarray(value, dtype=self.dtype)
        self.params[name] = self.ops.asarray(value)
        self.grads[name] = self.ops.xp.zeros_like(self.params[name])

    def add_linear(self, prefix, d_in, d_out, bias=True):
        """PyTorch's default init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias."""
        bound = 1.0 / math.sqrt(d_in)
        self.add_param(prefix + ".weight", self.rng.uniform(-bound, bound, (d_out, d_in)))
        if bias:
            self.add_param(prefix + ".bias", self.rng.uniform(-bound, bound, (d_out,)))

    def add_conv(self, prefix, c_in, c_out, k, transpose=False):
        """Conv2d weight (Cout, Cin, k, k) or ConvTranspose2d weight (Cin, Cout, k, k);
        PyTorch's default init, fan_in = weight.shape[1] * k * k in both cases."""
        shape = (c_in, c_out, k, k) if transpose else (c_out, c_in, k, k)
        bound = 1.0 / math.sqrt(shape[1] * k * k)
        self.add_param(prefix + ".weight", self.rng.uniform(-bound, bound, shape))
        self.add_param(prefix + ".bias", self.rng.uniform(-bound, bound, (c_out,)))

    def zero_grad(self):
        for g in self.grads.values():
            g[...] = 0

    def accumulate(self, name, g):
        self.grads[name] += g

    def num_parameters(self):
        return int(sum(int(np.prod(p.shape)) for p in self.params.values()))

    def state(self):
        """Parameters as host numpy arrays (for checkpoints)."""
        return {k: self.ops.to_numpy(v) for k, v in self.params.items()}

    def load_state(self, state):
        """Copy host arrays into the parameters; keys and shapes must match exactly, and the
        values be finite floating-point numbers (checked for all before any is copied)."""
        missing = sorted(set(self.params) - set(state))
        extra = sorted(set(state) - set(self.params))
        if missing or extra:
            raise ValueError(f"parameters do not match model {self.name!r}: missing {missing[:5]}, "
                             f"unexpected {extra[:5]}")
        for k, v in state.items():
            if tuple(v.shape) != tuple(self.params[k].shape):
                raise ValueError(f"parameter {k!r} of model {self.name!r} has shape "
                                 f"{tuple(self.params[k].shape)}; the state has {tuple(v.shape)}")
            if not np.issubdtype(np.dtype(v.dtype), np.floating):     # an int array would be cast silently
                raise ValueError(f"parameter {k!r} of model {self.name!r}: the state has dtype {v.dtype}; "
                                 f"parameters are floating point")
            xp = np if isinstance(v, np.ndarray) else self.ops.xp
            if not bool(xp.all(xp.isfinite(v))):
                raise ValueError(f"parameter {k!r} of model {self.name!r}: the state holds NaN or Inf values")
        for k, v in state.items():
            self.params[k][...] = self.ops.asarray(np.asarray(v, dtype=self.dtype))

    def spec(self):
        """What a checkpoint records to rebuild this model."""
        return {"name": self.name, "config": self.config, "dtype": self.dtype.name}

    # -- input checks ----------------------------------------------------------------------
    def check_input(self, x, trailing_shape, t=None):
        xp = self.ops.xp
        if x.ndim != 1 + len(trailing_shape) or tuple(x.shape[1:]) != tuple(trailing_shape):
            raise ValueError(f"model {self.name!r} expects x of shape (B, {', '.join(map(str, trailing_shape))}); "
                             f"got {tuple(x.shape)}")
        if not bool(xp.all(xp.isfinite(x))):
            raise ValueError(f"model {self.name!r}: x contains NaN or Inf")
        if t is not None:
            t = xp.asarray(t)
            if t.ndim != 1 or t.shape[0] != x.shape[0]:
                raise ValueError(f"model {self.name!r} expects t of shape ({x.shape[0]},); got {tuple(t.shape)}")
