"""Pictures of images: a grid (PNG) and the denoising as an animation (GIF).

Images are (N, 1, H, W) or (N, H, W) arrays in [-1, 1] (values outside are clipped for
display, never rescaled per image: the report's min-max normalisation of the DDPM images
alone made them look cleaner than the others, SEED_NOTES §4). The grid is plain NumPy;
PNGs go through matplotlib's Agg backend, GIFs through Pillow (a dependency of matplotlib).
"""
from __future__ import annotations

import math

import numpy as np


def _as_images(x):
    x = np.asarray(x, dtype=np.float64)
    if x.ndim == 4 and x.shape[1] == 1:
        x = x[:, 0]
    if x.ndim != 3 or x.shape[0] < 1:
        raise ValueError(f"images must have shape (N, 1, H, W) or (N, H, W) with N >= 1; got {x.shape}")
    if np.isnan(x).any():
        raise ValueError("images contain NaN")
    return x


def image_grid(x, nrow=None, pad=2, scale=1):
    """(N, [1,] H, W) in [-1, 1] -> one 2-D array in [0, 1]: `nrow` images per row
    (default ceil(sqrt(N))), `pad` pixels of mid-grey between them, each pixel repeated
    `scale` times in both directions. Missing cells of the last row are left grey."""
    x = _as_images(x)
    n, h, w = x.shape
    nrow = int(nrow or math.ceil(math.sqrt(n)))
    if nrow < 1 or pad < 0 or scale < 1:
        raise ValueError(f"need nrow >= 1, pad >= 0, scale >= 1; got nrow={nrow}, pad={pad}, scale={scale}")
    rows = math.ceil(n / nrow)
    img = (np.clip(x, -1, 1) + 1) / 2
    img = np.repeat(np.repeat(img, scale, axis=1), scale, axis=2)
    h, w = h * scale, w * scale
    grid = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad), 0.5)
    for k in range(n):
        r, c = divmod(k, nrow)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = img[k]
    return grid


def save_grid(path, x, nrow=None, pad=2, scale=2):
    """Write image_grid(x) as a greyscale PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.imsave(path, image_grid(x, nrow, pad, scale), cmap="gray", vmin=0.0, vmax=1.0)


def save_gif(path, frames, nrow=None, pad=2, scale=2, duration_ms=80, hold_last_ms=1500):
    """frames (F, N, [1,] H, W) -> an animated GIF of the grids, looping; the last frame is
    held `hold_last_ms` so the final samples can be seen."""
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - Pillow comes with matplotlib
        raise ValueError("writing a GIF needs Pillow: pip install pillow") from None
    frames = np.asarray(frames)
    if frames.ndim not in (4, 5) or frames.shape[0] < 1:
        raise ValueError(f"frames must have shape (F, N, [1,] H, W); got {frames.shape}")
    pics = [Image.fromarray(np.round(255 * image_grid(f, nrow, pad, scale)).astype(np.uint8))
            for f in frames]
    durations = [duration_ms] * (len(pics) - 1) + [max(duration_ms, hold_last_ms)]
    pics[0].save(path, save_all=True, append_images=pics[1:], duration=durations, loop=0)
