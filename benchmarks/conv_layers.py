"""Per-layer conv2d timings (forward, backward) of unet-seed's shapes: numba versions vs PyTorch.

    python benchmarks/conv_layers.py [--batch 128] [--versions 2,3,5] [--threads 2]
                                     [--out benchmarks/results/conv_layers.json]

For each (Cin -> Cout, image size) of unet-seed's 3 x 3 convs (stride 1, padding 1) and its
4 x 4 stride-2 downsamples, times the numba backend's conv2d forward and backward per
version (median of 9 after a warm-up; inputs channel-major, as the UNet hands them over)
and torch.nn.functional.conv2d's when torch is importable (its backward time is that of
forward + backward minus forward). GFLOP/s count 2 B Cin Cout kH kW Ho Wo per forward.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SHAPES = [  # (Cin, Cout, H, k, stride)
    (1, 10, 28, 3, 1), (10, 10, 28, 3, 1), (20, 10, 28, 3, 1), (10, 1, 28, 3, 1),
    (20, 20, 14, 3, 1), (40, 40, 7, 3, 1), (80, 80, 3, 3, 1), (160, 80, 3, 3, 1),
    (10, 10, 28, 4, 2), (20, 20, 14, 4, 2), (40, 40, 6, 4, 2),
]


def _median_ms(f, repeats=9):
    f()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts)) * 1e3


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--versions", default="2,3,5")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "conv_layers.json"))
    a = ap.parse_args(argv)
    import refdiff_cuda
    from _common import environment, set_threads, write_json
    set_threads(a.threads)
    try:
        import torch
    except ImportError:
        torch = None
    rng = np.random.default_rng(0)
    B, rows = a.batch, []
    for ci, co, H, k, s in SHAPES:
        x = np.ascontiguousarray(rng.standard_normal((ci, B, H, H)).astype(np.float32)).swapaxes(0, 1)
        w = (rng.standard_normal((co, ci, k, k)) / np.sqrt(ci * k * k)).astype(np.float32)
        b = np.zeros(co, np.float32)
        row = dict(cin=ci, cout=co, size=H, kernel=k, stride=s)
        ho = (H + 2 - k) // s + 1
        gflop = 2 * B * ci * co * k * k * ho * ho / 1e9
        row["forward_gflop"] = gflop
        for v in map(int, a.versions.split(",")):
            be = refdiff_cuda.get_backend("numba", versions={"conv2d": v})
            y, cache = be.conv2d_forward(x, w, b, s, 1)
            dy = np.ascontiguousarray(rng.standard_normal(y.shape).astype(np.float32).swapaxes(0, 1)).swapaxes(0, 1)
            f, bw = _median_ms(lambda: be.conv2d_forward(x, w, b, s, 1)), _median_ms(lambda: be.conv2d_backward(dy, cache))
            row[f"numba_v{v}_ms"] = dict(forward=f, backward=bw, forward_gflops=gflop / f * 1e3)
        if torch is not None:
            xt = torch.from_numpy(np.ascontiguousarray(x)).requires_grad_(True)
            wt, bt = torch.from_numpy(w).requires_grad_(True), torch.from_numpy(b).requires_grad_(True)
            dyt = torch.from_numpy(np.ascontiguousarray(dy))
            fwd = lambda: torch.nn.functional.conv2d(xt, wt, bt, s, 1)   # noqa: E731
            f = _median_ms(fwd)
            both = _median_ms(lambda: fwd().backward(dyt))
            row["torch_ms"] = dict(forward=f, backward=both - f, forward_gflops=gflop / f * 1e3)
        rows.append(row)
        print(f"{ci:4d}->{co:3d} {H:2d}x{H:<2d} k{k} s{s}: " + "  ".join(
            f"{key.replace('_ms', '')} {val['forward']:.2f}/{val['backward']:.2f} ms" for key, val in row.items()
            if key.endswith("_ms")))
    write_json(a.out, dict(benchmark="unet-seed conv2d layers, forward/backward ms, float32", batch=B,
                           threads=a.threads, layers=rows, environment=environment()))


if __name__ == "__main__":
    main()
