"""Argument checks shared by the reference's public functions.

Each check raises one clear error naming the parameter, and returns the value in the form
the caller computes with:

    TypeError   the kind is wrong: None or an int where a numpy Generator is due, a bool
                or a float where an integer is due (True is not 1 step, 2.5 is not 2),
                a string where a number is due, an array of strings or objects
    ValueError  the kind is right but the value is not allowed: out of range, NaN or Inf

Used by refdiff.sde, samplers, ddpm, losses, metrics, data.toy and the models' inputs, so
that the same mistake gives the same message everywhere.
"""
from __future__ import annotations

import math
import numbers

import numpy as np


def check_rng(rng, name="rng"):
    """A numpy.random.Generator (every random draw in refdiff takes one explicitly)."""
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"{name} must be a numpy.random.Generator (e.g. numpy.random.default_rng(seed)); "
                        f"got {type(rng).__name__}")
    return rng


def _range_text(lo, hi, lo_open, hi_open):
    if lo is not None and hi is not None:
        return f" in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    if lo is not None:
        return f" {'>' if lo_open else '>='} {lo}"
    if hi is not None:
        return f" {'<' if hi_open else '<='} {hi}"
    return ""


def check_int(value, name, lo=None, hi=None):
    """An integer (Python or numpy, not bool) in [lo, hi] -> int."""
    what = f"{name} must be an integer{_range_text(lo, hi, False, False)}"
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{what}; got {value!r} ({type(value).__name__})")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ValueError(f"{what}; got {value}")
    return int(value)


def check_real(value, name, lo=None, hi=None, lo_open=False, hi_open=False):
    """A finite real number (not bool) in the given interval -> float."""
    if lo is not None and hi is not None:
        what = f"{name} must lie in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'} (a finite number)"
    else:
        what = f"{name} must be a finite number{_range_text(lo, hi, lo_open, hi_open)}"
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{what}; got {value!r} ({type(value).__name__})")
    v = float(value)
    bad = (not math.isfinite(v)
           or (lo is not None and (v <= lo if lo_open else v < lo))
           or (hi is not None and (v >= hi if hi_open else v > hi)))
    if bad:
        raise ValueError(f"{what}; got {value!r}")
    return v


def check_positive_finite(value, name):
    """A finite real number > 0 -> float."""
    return check_real(value, name, lo=0, lo_open=True)


def check_array_float(a, name, finite=True):
    """An array of real numbers (bool, integer or floating dtype) -> float64 ndarray.
    Strings, objects and complex numbers are refused (TypeError); NaN or Inf too
    (ValueError) unless finite=False."""
    arr = np.asarray(a)
    if arr.dtype.kind not in "biuf":
        raise TypeError(f"{name} must be an array of real numbers; got dtype {arr.dtype}")
    arr = arr.astype(np.float64, copy=False)
    if finite and not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or Inf")
    return arr


def check_finite_times(t_host, owner):
    """A model's time input t (host array): NaN or Inf would silently turn the sinusoidal
    embedding, hence the whole output, into NaN. `owner` names the model."""
    if not np.all(np.isfinite(t_host)):
        raise ValueError(f"{owner}: t contains NaN or Inf")


def check_finite_state(ok, what, step, t):
    """Raise FloatingPointError when a sampler's score, model output or state stops being
    finite: `ok` is the (already reduced) bool, `what` says which, step and t say where."""
    if not ok:
        raise FloatingPointError(f"{what} contains NaN or Inf at step {step} (t = {t:.6g}); "
                                 f"the model or the score function diverged there")
