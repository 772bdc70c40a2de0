"""The op table every backend fills: names, which ops must be accelerated, version choice.

An op is a pair (`<op>_forward`, `<op>_backward`) or a single function; a backend module
declares `KERNELS = {op: {version: (forward, backward) or (function,)}}`. Version 1 is a
literal port of the reference; higher versions are faster and must agree with it too.
Forward and backward of a pair always come from the same version (their caches differ).
Every other name of `refdiff.backend.REFERENCE` falls back to the reference explicitly:
`backend.fallback` lists those names; for a device backend (`is_device` given to `build`)
the fallback runs the reference on host copies and moves array results back (host_fallback).
"""
from __future__ import annotations

import functools
import types

import numpy as np

from refdiff.backend import REFERENCE

PAIRS = {
    "linear": ("linear_forward", "linear_backward"),
    "silu": ("silu_forward", "silu_backward"),
    "relu": ("relu_forward", "relu_backward"),
    "concat": ("concat_forward", "concat_backward"),
    "add_channel_bias": ("add_channel_bias_forward", "add_channel_bias_backward"),
    "conv2d": ("conv2d_forward", "conv2d_backward"),
    "conv_transpose2d": ("conv_transpose2d_forward", "conv_transpose2d_backward"),
    "max_pool2d": ("max_pool2d_forward", "max_pool2d_backward"),
    "group_norm": ("group_norm_forward", "group_norm_backward"),
    "group_norm_silu": ("group_norm_silu_forward", "group_norm_silu_backward"),
    "mse": ("mse_forward", "mse_backward"),
    "time_embedding": ("time_embedding",),
    "adam_update": ("adam_update",),
    "ddpm_step": ("ddpm_step",),
    "em_step": ("em_step",),
}
REQUIRED = tuple(PAIRS)          # the list: a backend must accelerate all of these


def reference_namespace():
    """A copy of refdiff.backend.REFERENCE (the reference ops, sampler steps included)."""
    return types.SimpleNamespace(**vars(REFERENCE))


def normalise_versions(versions, kernels, backend):
    """versions: None (newest of each op), an int (that version wherever it exists, else the
    newest below it) or {op or op_forward/op_backward: int}. -> {op: version}."""
    chosen = {op: max(v) for op, v in kernels.items()}
    if versions is None:
        return chosen
    if isinstance(versions, int) and not isinstance(versions, bool):
        return {op: max([k for k in v if k <= versions] or [min(v)]) for op, v in kernels.items()}
    if not isinstance(versions, dict):
        raise ValueError(f"versions must be None, an int or a dict {{op: version}}; got {versions!r}")
    member = {name: op for op, names in PAIRS.items() for name in names}
    for key, ver in versions.items():
        op = key if key in kernels else member.get(key)
        if op not in kernels:
            raise ValueError(f"backend {backend!r} has no kernels for op {key!r}; ops: {sorted(kernels)}")
        if ver not in kernels[op]:
            raise ValueError(f"backend {backend!r}: op {op!r} has versions {sorted(kernels[op])}; got {ver!r}")
        chosen[op] = ver
    return chosen


def host_fallback(f, to_numpy, asarray, is_device):
    """The reference op f run on the host: device arrays among the arguments (and in list
    arguments, as concat takes) are copied to the host, NumPy arrays in the result (or
    directly in a result tuple) are copied to the device. Caches stay on the host, where
    the matching backward, also a fallback, reads them."""
    def host(a):
        if isinstance(a, list):
            return [host(x) for x in a]
        return to_numpy(a) if is_device(a) else a

    def device(r):
        return asarray(r) if isinstance(r, np.ndarray) else r

    @functools.wraps(f)
    def on_host(*args, **kwargs):
        out = f(*[host(a) for a in args], **{k: host(v) for k, v in kwargs.items()})
        return tuple(device(r) for r in out) if isinstance(out, tuple) else device(out)
    return on_host


def build(name, kernels, versions, xp, asarray, to_numpy, is_device=None, **extra):
    """A backend namespace: reference names first (explicit fallbacks), then the kernels.
    is_device(a) -> whether a is a device array: given for backends whose arrays are not
    NumPy arrays, whose fallbacks then run on host copies (host_fallback)."""
    missing = [op for op in REQUIRED if op not in kernels]
    if missing:
        raise AssertionError(f"backend {name!r} lacks required ops {missing}")
    chosen = normalise_versions(versions, kernels, name)
    ref = reference_namespace()
    accelerated = {n for op in kernels for n in PAIRS[op]}
    fallback = tuple(sorted(k for k, v in vars(ref).items()
                            if callable(v) and not isinstance(v, type) and k not in accelerated
                            and not k.startswith("_") and k not in ("asarray", "to_numpy")))
    ns = types.SimpleNamespace()
    for k in fallback:
        f = getattr(ref, k)
        setattr(ns, k, host_fallback(f, to_numpy, asarray, is_device) if is_device else f)
    for op, ver in chosen.items():
        for fname, f in zip(PAIRS[op], kernels[op][ver]):
            setattr(ns, fname, f)
    ns.name, ns.xp, ns.asarray, ns.to_numpy = name, xp, asarray, to_numpy
    ns.versions, ns.fallback = chosen, fallback
    ns.available_versions = {op: sorted(v) for op, v in kernels.items()}
    for k, v in extra.items():
        setattr(ns, k, v)
    return ns
