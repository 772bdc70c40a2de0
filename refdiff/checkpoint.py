"""Checkpoints: one .npz file, written atomically, checked on load.

Layout: every array under its own key (`params/<name>`, `ema/<name>`, `optim/<key>`,
`extra/<key>`) plus `__meta__`, a JSON document stored as uint8 bytes holding the format
version, the model spec (name, config, dtype), free-form metadata (config, epoch, rng
state...) and a SHA-256 of every array, so that a truncated or tampered file is refused
with a clear message rather than loaded half-way.

Writing goes to `<path>.tmp`, is flushed and fsync'ed, then renamed over `path`
(os.replace is atomic on POSIX): a run killed mid-write leaves the previous checkpoint
intact.
"""
from __future__ import annotations

import hashlib
import json
import os
import zipfile

import numpy as np

FORMAT = "refdiff-checkpoint-v1"


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt, tampered with, or for another model."""


def _digest(arr):
    a = np.ascontiguousarray(arr)
    h = hashlib.sha256()
    h.update(str(a.dtype).encode() + str(a.shape).encode())
    h.update(a.tobytes())
    return h.hexdigest()


def save(path, arrays, meta):
    """Atomically write `arrays` (dict key -> ndarray) and JSON-able `meta` to `path`."""
    arrays = {k: np.asarray(v) for k, v in arrays.items()}
    meta = dict(meta, format=FORMAT, sha256={k: _digest(v) for k, v in arrays.items()})
    blob = np.frombuffer(json.dumps(meta, sort_keys=True).encode(), dtype=np.uint8)
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        np.savez(f, __meta__=blob, **arrays)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load(path):
    """-> (arrays, meta). Raises CheckpointError naming what is wrong."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist")
    try:
        with np.load(path, allow_pickle=False) as z:
            if "__meta__" not in z.files:
                raise CheckpointError(f"{path!r} is not a refdiff checkpoint (no __meta__ entry)")
            meta = json.loads(bytes(z["__meta__"]).decode())
            arrays = {k: z[k] for k in z.files if k != "__meta__"}
    except CheckpointError:
        raise
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, KeyError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"checkpoint {path!r} is corrupt or truncated ({type(exc).__name__}: {exc})") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path!r} has format {meta.get('format')!r}; expected {FORMAT!r}")
    sums = meta.get("sha256", {})
    if set(sums) != set(arrays):
        raise CheckpointError(f"checkpoint {path!r} was tampered with: its arrays do not match its manifest")
    for k, v in arrays.items():
        if _digest(v) != sums[k]:
            raise CheckpointError(f"checkpoint {path!r} was tampered with or corrupted: array {k!r} fails its checksum")
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


def load_model(path, backend=None, expect=None, use_ema=False):
    """Rebuild the model stored in `path`. Returns (model, arrays-by-section, meta).

    `expect`: a model name (or a spec dict) the checkpoint must hold; a mismatch raises
    CheckpointError naming both architectures. `use_ema`: load the EMA weights as params.
    """
    from .nn import model_from_spec

    arrays, meta = load(path)
    spec = meta.get("model")
    if not spec:
        raise CheckpointError(f"checkpoint {path!r} records no model")
    if expect is not None:
        want = expect if isinstance(expect, dict) else {"name": expect}
        for key, val in want.items():
            if spec.get(key) != val:
                raise CheckpointError(f"checkpoint {path!r} holds a {spec.get('name')!r} model with "
                                      f"{key}={spec.get(key)!r}; expected {key}={val!r}")
    model = model_from_spec(spec, backend=backend)
    sections = {s: _section(arrays, s + "/") for s in ("params", "ema", "optim", "extra")}
    state = sections["ema"] if use_ema and sections["ema"] else sections["params"]
    state = {k: v for k, v in state.items() if not k.startswith("__")}   # EMA bookkeeping
    try:
        model.load_state(state)
    except ValueError as exc:
        raise CheckpointError(f"checkpoint {path!r} does not match its architecture: {exc}") from None
    return model, sections, meta
