"""Memory layouts of the numba backend (CPU; arrays are numpy arrays).

Version-2 kernels keep image batches channel-major in memory: the buffer is (C, B, H, W)
and the op returns its NCHW-shaped view `buf.swapaxes(0, 1)`. Shapes, values and dtypes
are those of the reference; only the strides differ, which NumPy code (the models' `+`,
`astype`, `reshape`) handles transparently. Why: a conv's GEMM  y = w cols  yields
(Cout, B Ho Wo) directly, so no op pays a transpose, and concat along channels is a copy of
whole contiguous blocks. Every op accepts any strides: `cm(x)` returns the channel-major
buffer without a copy when x already is such a view, and copies once otherwise.
"""
from __future__ import annotations

import numpy as np


def native(x):
    """x as an array in the machine's byte order (the numba kernels are compiled for it)."""
    x = np.asarray(x)
    return x if x.dtype.isnative else x.astype(x.dtype.newbyteorder("="))


def cm(x, dtype=None):
    """(B, C, *S) -> C-contiguous (C, B, *S) (a view when x is a channel-major view)."""
    x = np.asarray(x) if dtype is None else np.asarray(x).astype(dtype, copy=False)
    t = x.swapaxes(0, 1)
    return t if t.flags.c_contiguous else np.ascontiguousarray(t)


def nchw(buf):
    """(C, B, *S) buffer -> its (B, C, *S) view."""
    return buf.swapaxes(0, 1)


def flat_pair(x, *others):
    """1-D views of x and `others` (same shape, own dtypes) in x's memory order, plus a function that
    turns a new 1-D result back into an array shaped and laid out like x. Elementwise kernels
    thus work on whatever layout arrives (NCHW or channel-major) without a transpose."""
    x = np.asarray(x)
    if x.flags.c_contiguous or x.ndim < 2:
        xc = np.ascontiguousarray(x)
        outs = [np.ascontiguousarray(np.asarray(o)).reshape(-1) for o in others]
        return xc.reshape(-1), outs, lambda f: f.reshape(x.shape)
    t = x.swapaxes(0, 1)
    if t.flags.c_contiguous:
        outs = [np.ascontiguousarray(np.asarray(o).swapaxes(0, 1)).reshape(-1) for o in others]
        return t.reshape(-1), outs, lambda f: f.reshape(t.shape).swapaxes(0, 1)
    xc = np.ascontiguousarray(x)
    outs = [np.ascontiguousarray(np.asarray(o)).reshape(-1) for o in others]
    return xc.reshape(-1), outs, lambda f: f.reshape(x.shape)
