"""The array module of the arrays an op is given: NumPy, or CuPy for CuPy arrays.

    xp = array_module(x, w)     numpy for NumPy arrays (and scalars), cupy for CuPy arrays

The reference ops (functional.py, conv.py, norm.py) take `xp` from their inputs, as CuPy's
own `cupy.get_array_module` does, so the same functions run on the host and on a GPU: they
are version 1 of the `cupy` backend (refdiff_cuda/cupy_backend). CuPy is never imported
here: an array can only be a CuPy array if CuPy is already in `sys.modules`.
"""
from __future__ import annotations

import sys

import numpy as np

__all__ = ["array_module", "strided_view"]


def array_module(*arrays):
    """cupy if any argument is a cupy.ndarray, else numpy."""
    cupy = sys.modules.get("cupy")
    if cupy is not None:
        for a in arrays:
            if isinstance(a, cupy.ndarray):
                return cupy
    return np


def strided_view(xp, x, shape, strides):
    """A strided view of x (as_strided): read-only under NumPy; CuPy's as_strided has no
    `writeable` flag, and its views are only ever read here too."""
    if xp is np:
        return np.lib.stride_tricks.as_strided(x, shape, strides, writeable=False)
    return xp.lib.stride_tricks.as_strided(x, shape, strides)
