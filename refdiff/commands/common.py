"""What the commands share: argparse value types and the --backend flag (its choices are
refdiff_cuda.BACKENDS, the one list of backends)."""
from __future__ import annotations

import argparse
import math


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


def nonnegative_int(s):
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0; got {s!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0; got {s!r}")
    return v


def nonnegative_float(s):
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0; got {s!r}") from None
    if not (math.isfinite(v) and v >= 0):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0; got {s!r}")
    return v


def probability_below_one(s):
    """A probability in [0, 1) (1 would drop every label)."""
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a probability in [0, 1); got {s!r}") from None
    if not 0 <= v < 1:
        raise argparse.ArgumentTypeError(f"expected a probability in [0, 1); got {s!r}")
    return v


def int_list(s):
    """K or K1,K2,... -> list of ints >= 0."""
    try:
        v = [int(p) for p in s.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a class K or a comma list K1,K2,...; got {s!r}") from None
    if any(k < 0 for k in v):
        raise argparse.ArgumentTypeError(f"expected classes >= 0; got {s!r}")
    return v


def add_backend_flag(p, default="numpy", help="where the model's ops run (default %(default)s)"):
    from refdiff_cuda import BACKENDS
    p.add_argument("--backend", default=default, choices=BACKENDS, help=help)
