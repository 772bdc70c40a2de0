"""Checkpoints: one .npz file, written atomically, checked on load.

Layout: every array under its own key (`params/<name>`, `ema/<name>`, `optim/<key>`,
`extra/<key>`) plus `__meta__`, a JSON document stored as uint8 bytes holding the format
version, the model spec (name, config, dtype), free-form metadata (config, epoch, rng
state...) and a SHA-256 of every array, so that a truncated or tampered file is refused
with a clear message rather than loaded half-way.

Writing goes through refdiff.io.atomic_write (a uniquely named temporary in the same
directory, fsync'ed, then renamed over `path`): a run killed mid-write leaves the previous
checkpoint intact. What is written is checked first, and what is read is checked again:
parameters and EMA weights are floating point, and every floating-point array is finite
(a diverged run's weights are never saved, nor loaded from a file written elsewhere).

Whatever is wrong with a file given as a checkpoint (missing, a directory, a plain .npy,
any truncation, a flipped byte anywhere including the zip and .npy headers, a manifest or
model spec of the wrong shape), `load` and `load_model` raise CheckpointError and nothing
else (tests/test_checkpoint_corruption.py flips and truncates bytes at random).
"""
from __future__ import annotations

import hashlib
import json
import os

import numpy as np

from .io import atomic_write

FORMAT = "refdiff-checkpoint-v1"
WEIGHT_SECTIONS = ("params/", "ema/")      # arrays that must be floating point


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt, tampered with, or for another model."""


def _digest(arr):
    a = np.ascontiguousarray(arr)
    h = hashlib.sha256()
    h.update(str(a.dtype).encode() + str(a.shape).encode())
    h.update(a.tobytes())
    return h.hexdigest()


def check_arrays(arrays):
    """-> None if every weight array (params/, ema/; bookkeeping keys `__x__` aside) is
    floating point and every floating-point array is finite, else a sentence saying which is not."""
    for k, v in arrays.items():
        weight = k.startswith(WEIGHT_SECTIONS) and not k.rsplit("/", 1)[-1].startswith("__")
        if weight and not np.issubdtype(v.dtype, np.floating):
            return f"array {k!r} has dtype {v.dtype}; weights are floating point (float32 or float64)"
        if np.issubdtype(v.dtype, np.inexact) and not np.all(np.isfinite(v)):
            return f"array {k!r} holds {int(np.sum(~np.isfinite(v)))} NaN or Inf values of {v.size}"
    return None


def save(path, arrays, meta):
    """Atomically write `arrays` (dict key -> ndarray) and JSON-able `meta` to `path`.
    ValueError (before anything is written) if a weight is not floating point or any
    floating-point array holds NaN or Inf."""
    arrays = {k: np.asarray(v) for k, v in arrays.items()}
    bad = check_arrays(arrays)
    if bad:
        raise ValueError(f"refusing to write checkpoint {os.fspath(path)!r}: {bad}")
    meta = dict(meta, format=FORMAT, sha256={k: _digest(v) for k, v in arrays.items()})
    blob = np.frombuffer(json.dumps(meta, sort_keys=True).encode(), dtype=np.uint8)
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_write(path, "wb") as f:
        np.savez(f, __meta__=blob, **arrays)


def _read(path):
    """The raw (arrays, meta) of an .npz; any failure of the zip or .npy layers is CheckpointError."""
    try:
        z = np.load(path, allow_pickle=False)
    except Exception as exc:       # noqa: BLE001 - a corrupt file can fail in any layer (zip, npy, json)
        raise CheckpointError(f"checkpoint {path!r} is corrupt or truncated, or not a checkpoint "
                              f"({type(exc).__name__}: {exc})") from None
    if not isinstance(z, np.lib.npyio.NpzFile):
        raise CheckpointError(f"{path!r} is a single .npy array, not a refdiff checkpoint (.npz)")
    try:
        with z:
            if "__meta__" not in z.files:
                raise CheckpointError(f"{path!r} is not a refdiff checkpoint (no __meta__ entry)")
            meta = json.loads(bytes(z["__meta__"]).decode())
            arrays = {k: z[k] for k in z.files if k != "__meta__"}
    except CheckpointError:
        raise
    except Exception as exc:       # noqa: BLE001 - zipfile raises NotImplementedError, RuntimeError, ...
        raise CheckpointError(f"checkpoint {path!r} is corrupt or truncated ({type(exc).__name__}: {exc})") from None
    return arrays, meta


def load(path):
    """-> (arrays, meta). Raises CheckpointError naming what is wrong (see the module docstring)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist")
    if os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path!r} is a directory; give the checkpoint.npz file in it")
    arrays, meta = _read(path)
    if not isinstance(meta, dict):
        raise CheckpointError(f"checkpoint {path!r} is malformed: its __meta__ is a JSON {type(meta).__name__}, "
                              f"not an object")
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path!r} has format {meta.get('format')!r}; expected {FORMAT!r}")
    sums = meta.get("sha256")
    if not isinstance(sums, dict) or not all(isinstance(v, str) for v in sums.values()):
        raise CheckpointError(f"checkpoint {path!r} is malformed: its manifest (sha256) is not a table of digests")
    if set(sums) != set(arrays):
        raise CheckpointError(f"checkpoint {path!r} was tampered with: its arrays do not match its manifest")
    for k, v in arrays.items():
        if _digest(v) != sums[k]:
            raise CheckpointError(f"checkpoint {path!r} was tampered with or corrupted: array {k!r} fails its checksum")
    bad = check_arrays(arrays)
    if bad:
        raise CheckpointError(f"checkpoint {path!r} is refused: {bad}")
    return arrays, meta


def save_model(path, model, ema=None, optimizer=None, extra_arrays=None, **meta):
    """Save a model (and optionally its EMA weights, optimizer state, extra arrays)."""
    arrays = {f"params/{k}": v for k, v in model.state().items()}
    if ema is not None:
        arrays.update({f"ema/{k}": v for k, v in ema.state().items()})
    if optimizer is not None:
        arrays.update({f"optim/{k}": v for k, v in optimizer.state().items()})
    for k, v in (extra_arrays or {}).items():
        arrays[f"extra/{k}"] = v
    save(path, arrays, dict(meta, model=model.spec()))


def _section(arrays, prefix):
    n = len(prefix)
    return {k[n:]: v for k, v in arrays.items() if k.startswith(prefix)}


def model_spec(path, meta):
    """meta["model"] checked to be a spec {name: str, config: dict, dtype: float32|float64}."""
    spec = meta.get("model")
    if not spec:
        raise CheckpointError(f"checkpoint {path!r} records no model")
    if not (isinstance(spec, dict) and isinstance(spec.get("name"), str) and isinstance(spec.get("config"), dict)
            and spec.get("dtype") in ("float32", "float64")):
        raise CheckpointError(f"checkpoint {path!r} is malformed: its model spec {spec!r} is not "
                              f"{{name: str, config: dict, dtype: 'float32' | 'float64'}}")
    return spec


def load_model(path, backend=None, expect=None, use_ema=False):
    """Rebuild the model stored in `path`. Returns (model, arrays-by-section, meta).

    `expect`: a model name (or a spec dict) the checkpoint must hold; a mismatch raises
    CheckpointError naming both architectures. `use_ema`: load the EMA weights as params.
    """
    from .backend import get_ops
    from .nn import model_from_spec

    ops = get_ops(backend)           # a backend that cannot run here is not the file's fault
    arrays, meta = load(path)
    spec = model_spec(path, meta)
    if expect is not None:
        want = expect if isinstance(expect, dict) else {"name": expect}
        for key, val in want.items():
            if spec.get(key) != val:
                raise CheckpointError(f"checkpoint {path!r} holds a {spec.get('name')!r} model with "
                                      f"{key}={spec.get(key)!r}; expected {key}={val!r}")
    try:
        model = model_from_spec(spec, backend=ops)
    except (ValueError, TypeError, KeyError, OverflowError) as exc:
        raise CheckpointError(f"checkpoint {path!r} records a model that cannot be built "
                              f"({type(exc).__name__}: {exc})") from None
    sections = {s: _section(arrays, s + "/") for s in ("params", "ema", "optim", "extra")}
    state = sections["ema"] if use_ema and sections["ema"] else sections["params"]
    state = {k: v for k, v in state.items() if not k.startswith("__")}   # EMA bookkeeping
    try:
        model.load_state(state)
    except ValueError as exc:
        raise CheckpointError(f"checkpoint {path!r} does not match its architecture: {exc}") from None
    return model, sections, meta
