"""silu version 3 (numba, CPU): the float32 forward by a SIMD kernel (_simd._ir_silu), in
parallel over chunks. Twin of refdiff/nn/functional.py's silu; the backward is version 2's.

Why: version 2 (and the reference) take sigmoid(x) = (1 + tanh(x/2)) / 2 from NumPy's tanh,
one single-threaded pass, then a parallel pass for y = x s: 0.57 ms on unet-seed's
(128, 10, 28, 28) activations, 67 calls per training step. The kernel computes
s = 1 / (1 + exp(-x)) with Cephes' exp polynomial (<= 2 ulp for s, <= 3 ulp for y, measured
against float64 for x in [-15, 80]), and y = x s, in one pass on all threads. It is the more
accurate of the two where sigmoid is tiny: 1 + tanh(x/2) cancels, and the reference returns
s = 0 in float32 from x < -17 on, where the kernel keeps e^x down to x = -88 (s = 0 below,
as exp(-x) overflows). NaN gives NaN, -inf gives y = NaN (-inf x 0), as the reference.
float64 runs version 2 unchanged.
"""
from __future__ import annotations

import functools
import math

import numpy as np
from numba import prange

from . import _simd
from ._cache import cached_njit
from ._layout import flat_pair, native
from .functional import silu_backward_v2, silu_forward_v2

_CHUNK = 16384        # elements per kernel call (a multiple of 16)


@functools.lru_cache(maxsize=None)
def _loop():
    k = _simd.silu_function()

    @cached_njit(parallel=True)
    def loop(x, y, s):
        n = x.size
        main = n - n % 16
        for c in prange((main + _CHUNK - 1) // _CHUNK):
            i0 = c * _CHUNK
            m = min(_CHUNK, main - i0)
            k(x[i0:].ctypes, y[i0:].ctypes, s[i0:].ctypes, m)
        for i in range(main, n):                    # the last n % 16 entries, same formula
            a = -x[i]
            si = np.float32(0.0) if a > 88.0 else np.float32(1.0 / (1.0 + math.exp(a)))
            s[i] = si if x[i] == x[i] else x[i]
            y[i] = x[i] * s[i]
    return loop


def silu_forward_v3(x):
    x = native(x)
    if x.dtype != np.float32:
        return silu_forward_v2(x)
    xf, _, back = flat_pair(x)
    y, s = np.empty_like(xf), np.empty_like(xf)
    _loop()(xf, y, s)
    return back(y), (xf, s, back)


silu_backward_v3 = silu_backward_v2
