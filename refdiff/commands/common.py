"""What the commands share: argparse value types and the --backend flag (its choices are
refdiff_cuda.BACKENDS, the one list of backends)."""
from __future__ import annotations

import argparse
import math


def _number_type(name, convert, ok, unparsable, out_of_range):
    """An argparse type: `convert` the string (a failure: `unparsable`), then `ok(value)` (else
    `out_of_range`); both messages end with the given string."""
    def parse(s):
        try:
            v = convert(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{unparsable}; got {s!r}") from None
        if not ok(v):
            raise argparse.ArgumentTypeError(f"{out_of_range}; got {s!r}")
        return v
    parse.__name__ = parse.__qualname__ = name
    return parse


positive_int = _number_type("positive_int", int, lambda v: v >= 1, "expected a positive integer",
                            "expected a positive integer")
positive_float = _number_type("positive_float", float, lambda v: math.isfinite(v) and v > 0,
                              "expected a positive number", "expected a finite positive number")
nonnegative_int = _number_type("nonnegative_int", int, lambda v: v >= 0, "expected an integer >= 0",
                               "expected an integer >= 0")
nonnegative_float = _number_type("nonnegative_float", float, lambda v: math.isfinite(v) and v >= 0,
                                 "expected a number >= 0", "expected a finite number >= 0")
# a probability in [0, 1) (1 would drop every label)
probability_below_one = _number_type("probability_below_one", float, lambda v: 0 <= v < 1,
                                     "expected a probability in [0, 1)", "expected a probability in [0, 1)")


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
