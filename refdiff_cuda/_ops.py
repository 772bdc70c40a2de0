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
    "spatial_attention": ("spatial_attention_forward", "spatial_attention_backward"),
    "upsample_nearest2x": ("upsample_nearest2x_forward", "upsample_nearest2x_backward"),
    "dropout": ("dropout_forward", "dropout_backward"),
}
REQUIRED = tuple(PAIRS)          # a backend must accelerate every one of these


def reference_namespace():
    """A copy of refdiff.backend.REFERENCE (the reference ops, sampler steps included)."""
    return types.SimpleNamespace(**vars(REFERENCE))


def _is_int(v):
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def check_versions_type(versions, backend):
    """TypeError unless versions is None, an int (not a bool) or {str: int}: checked before
    anything is built or looked up (True == 1 would otherwise find version 1's backend)."""
    ok = versions is None or _is_int(versions) or (
        isinstance(versions, dict) and all(isinstance(k, str) and _is_int(v) for k, v in versions.items()))
    if not ok:
        raise TypeError(f"backend {backend!r}: versions must be None, an int >= 1 or a dict {{op name: int}}; "
                        f"got {versions!r}")


def normalise_versions(versions, kernels, backend):
    """Which version of each op a backend runs: -> {op: version}.

    versions: None (the newest of every op); an int k >= 1 that some op has (every op at
    version k where it has one, else its newest below k: 1 is every op's literal port); or
    {op or op_forward/op_backward: version} (a member of a pair selects the pair; others
    stay newest). Anything else is a TypeError or ValueError naming the op and its versions.
    """
    chosen = {op: max(v) for op, v in kernels.items()}
    table = ", ".join(f"{op} {sorted(v)}" for op, v in sorted(kernels.items()))
    if versions is None:
        return chosen
    if _is_int(versions):
        top = max(max(v) for v in kernels.values())
        if not 1 <= versions <= top:
            raise ValueError(f"backend {backend!r}: versions={versions!r} is not a kernel version; versions run "
                             f"from 1 (the literal ports) to {top} (per op: {table})")
        return {op: max(k for k in v if k <= versions) for op, v in kernels.items()}
    if not isinstance(versions, dict):
        raise TypeError(f"backend {backend!r}: versions must be None, an int or a dict {{op: version}}; "
                        f"got {versions!r} ({type(versions).__name__})")
    member = {name: op for op, names in PAIRS.items() for name in names}
    for key, ver in versions.items():
        op = key if key in kernels else member.get(key)
        if op not in kernels:
            raise ValueError(f"backend {backend!r} has no kernels for op {key!r}; ops: {sorted(kernels)}")
        if not _is_int(ver):
            raise TypeError(f"backend {backend!r}: the version of op {key!r} must be an int, one of "
                            f"{sorted(kernels[op])}; got {ver!r} ({type(ver).__name__})")
        if ver not in kernels[op]:
            raise ValueError(f"backend {backend!r}: op {op!r} has versions {sorted(kernels[op])}; got {ver!r}")
        chosen[op] = int(ver)
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
