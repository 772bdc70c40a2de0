"""Helpers shared by the commands: argument types, JSON output, progress lines."""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time


def positive_int(s):
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer; got {s!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer; got {s!r}")
    return v


def positive_float(s):
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number; got {s!r}") from None
    if not (math.isfinite(v) and v > 0):
        raise argparse.ArgumentTypeError(f"expected a finite positive number; got {s!r}")
    return v


def write_json(path, obj):
    """Write JSON atomically (temporary file, then rename)."""
    tmp = os.fspath(path) + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=_jsonable)
        f.write("\n")
    os.replace(tmp, path)


def _jsonable(o):
    try:
        import numpy as np
        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
    except ImportError:  # pragma: no cover
        pass
    return str(o)


class Progress:
    """One overwritten status line on a terminal, a plain line every `every` s otherwise."""

    def __init__(self, total, label="", every=5.0, stream=sys.stderr):
        self.total, self.label, self.every, self.stream = total, label, every, stream
        self.start = self.last = time.perf_counter()
        self.tty = stream.isatty()

    def update(self, done, **fields):
        now = time.perf_counter()
        if not self.tty and now - self.last < self.every and done < self.total:
            return
        self.last = now
        el = now - self.start
        eta = el / done * (self.total - done) if done else float("nan")
        items = " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in fields.items())
        msg = f"{self.label} {done}/{self.total} {items} elapsed {el:.0f}s eta {eta:.0f}s"
        if self.tty:
            self.stream.write("\r" + msg + " " * 5 + ("\n" if done >= self.total else ""))
        else:
            self.stream.write(msg + "\n")
        self.stream.flush()
