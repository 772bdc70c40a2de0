"""Where one fused layer's time goes on the numba backend: versions 2 and 3 of conv2d_silu and
group_norm_conv2d on one layer shape, then version 3's parts timed one by one.

    NUMBA_NUM_THREADS=1 python benchmarks/fused_layer.py [--cin 10] [--cout 10] [--size 28]
                                                         [--batch 64] [--groups 5] [--repeats 20]

A 3 x 3 convolution with padding 1, float32 (unet-seed's 10 -> 10 layer at 28 x 28 by default;
--size 3 takes version 3's dense product). Printed: each version's time per call (the fastest
of --repeats, and the median) and GFLOP/s of the convolution's 2 B Cin Cout 9 H W flops; for
the per-sample frame, the parts of version 3 over the whole batch, each run alone on one
sample's buffers after another as the op runs them: GroupNorm's statistics, the normalising
input pass, the plain input copy, SiLU over the input planes, the micro-kernel, SiLU (with the
bias) over the output rows, and the copy of the valid columns out. Run it on one thread
(NUMBA_NUM_THREADS=1) for times that mean one core. Ratios, printed; not a benchmark: no JSON.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))                   # _common
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # refdiff, uninstalled

from _common import median_time  # noqa: E402


def _best(f, repeats):
    """(fastest, median) seconds of f over `repeats` calls, after an untimed one."""
    f()
    median, times = median_time(f, repeats)
    return min(times), median


def _parts(x, w, b, G, shift, repeats):
    """{part: (fastest, median) seconds over the batch} of version 3's per-sample frame."""
    from numba import njit

    from refdiff_cuda.numba_cpu import _simd
    from refdiff_cuda.numba_cpu.conv_v4 import _narrow
    from refdiff_cuda.numba_cpu.fused import _blocks, group_stats
    from refdiff_cuda.numba_cpu.fused_v3 import _fill_copy, _fill_norm, _frame
    F32 = np.float32
    C, B, H, W = x.shape
    Cout = w.shape[0]
    Wp, Ho, ldx, ldy, off = _frame(x.shape, w, 1)
    xp, yw, Y = np.zeros((C, ldx), F32), np.zeros((Cout, ldy), F32), np.empty((Cout, B, Ho, W), F32)
    mean, rstd = np.zeros((B, G), F32), np.zeros((B, G), F32)
    gamma, beta, bias = np.ones(C, F32), np.zeros(C, F32), np.asarray(b, F32)
    w2 = np.ascontiguousarray(w.reshape(Cout, -1))
    bsilu = _simd.bias_silu_function()
    gemm = _blocks()[1]

    @njit
    def stats(x, shift, mean, rstd):
        for s in range(x.shape[1]):
            for g in range(mean.shape[1]):
                group_stats(x, shift, True, s, g, mean.shape[1], F32(1e-5), F32(1), mean, rstd)

    @njit
    def fill(x, shift, mean, rstd, gamma, beta, xp):
        for s in range(x.shape[1]):
            _fill_norm(x, s, shift, True, mean, rstd, gamma, beta, mean.shape[1], 1, 1, xp)

    @njit
    def copy(x, xp):
        for s in range(x.shape[1]):
            _fill_copy(x, s, 1, 1, xp)

    @njit
    def silu(a, B, bias):
        for s in range(B):
            for c in range(a.shape[0]):
                bsilu(a[c].ctypes, a.shape[1], bias[c % bias.shape[0]])

    @njit
    def narrow(yw, Y, bias):
        for s in range(Y.shape[1]):
            _narrow(yw, s, 1, Wp, yw.shape[1], bias, True, Y)

    @njit
    def kernel(xp, w2, yw):
        for _ in range(B):             # the op's own blocks of the micro-kernel (fused._blocks)
            gemm(xp.reshape(-1), off, w2.reshape(-1), Cout, w2.shape[1], yw.reshape(-1), ldy, Ho * Wp)

    zero = np.zeros(1, F32)
    return {"GroupNorm statistics": _best(lambda: stats(x, shift, mean, rstd), repeats),
            "normalising input pass": _best(lambda: fill(x, shift, mean, rstd, gamma, beta, xp), repeats),
            "plain input copy": _best(lambda: copy(x, xp), repeats),
            "SiLU over the input planes": _best(lambda: silu(xp, B, zero), repeats),
            "micro-kernel": _best(lambda: kernel(xp, w2, yw), repeats),
            "bias + SiLU over the output rows": _best(lambda: silu(yw, B, bias), repeats),
            "valid columns out": _best(lambda: narrow(yw, Y, bias), repeats)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cin", type=int, default=10)
    ap.add_argument("--cout", type=int, default=10)
    ap.add_argument("--size", type=int, default=28)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--groups", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=20)
    a = ap.parse_args(argv)
    for flag in ("cin", "cout", "size", "batch", "groups", "repeats"):
        if getattr(a, flag) < 1:
            ap.error(f"--{flag} must be >= 1")
    if a.cin % a.groups:
        ap.error("--groups must divide --cin")
    import numba

    import refdiff_cuda as rc
    rng = np.random.default_rng(0)
    C, B, H = a.cin, a.batch, a.size
    xc = (rng.standard_normal((C, B, H, H)) + 0.5).astype(np.float32)
    x = xc.swapaxes(0, 1)                      # channel-major, as the backend's ops hand it on
    w = (rng.standard_normal((a.cout, C, 3, 3)) / np.sqrt(9 * C)).astype(np.float32)
    b, shift = rng.standard_normal(a.cout).astype(np.float32), rng.standard_normal((B, C)).astype(np.float32)
    g, beta = np.ones(C, np.float32), np.zeros(C, np.float32)
    flop = 2 * B * C * a.cout * 9 * H * H
    print(f"{C} -> {a.cout} at {H} x {H}, batch {B}, 3 x 3, padding 1, float32, {numba.get_num_threads()} thread(s); "
          f"{flop / 1e6:.0f} MFLOP per call")
    for v in (2, 3):
        be = rc.get_backend("numba", versions={"conv2d_silu": v, "group_norm_conv2d": v})
        for name, f in (("conv2d_silu", lambda: be.conv2d_silu_forward(x, w, b, 1, 1)),
                        ("group_norm_conv2d", lambda: be.group_norm_conv2d_forward(x, a.groups, g, beta, w, b, shift,
                                                                                   1, 1, True, True))):
            best, med = _best(f, a.repeats)
            print(f"  version {v} {name:18s} {best * 1e3:8.3f} ms (median {med * 1e3:.3f}) "
                  f"{flop / best / 1e9:6.1f} GFLOP/s")
    if H * H <= 9:
        print("(an image no larger than the kernel: version 3 runs its dense product, not the per-sample frame)")
        return 0
    print("version 3's parts, over the batch:")
    for part, (best, med) in _parts(xc, w, b, a.groups, shift, a.repeats).items():
        print(f"  {part:34s} {best * 1e3:8.3f} ms (median {med * 1e3:.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
