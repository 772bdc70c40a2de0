"""Every figure refdiff draws: image grids (PNG), the denoising as an animation (GIF), the
ring experiment's panel (report fig. 2.1), and the comparison's label histograms and
best-image-per-label grid (report figs. 3.4 and 3.5).

Images are (N, 1, H, W) or (N, H, W) arrays in [-1, 1]; values outside are clipped for
display, never rescaled per image (the report min-max normalised the DDPM images alone,
which made them look cleaner than the others: report §3.4.3, fig. 3.5). The grid itself is
plain NumPy (`image_grid`, tested); drawing goes through matplotlib's Agg backend, selected
here and only when a figure is drawn (`pyplot`), so importing refdiff never touches
matplotlib. GIFs go through Pillow (a dependency of matplotlib). Every file is written
atomically (refdiff.io.atomic_write).
"""
from __future__ import annotations

import math
import os

import numpy as np

from .io import atomic_write

ROW_TITLES = {"real": "real (held-out)", "vae": "VAE", "gan": "GAN", "ddpm": "DDPM"}


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed); the one place that picks it."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path, dpi):
    """Write a matplotlib figure to `path` atomically (format from the extension), then close it."""
    plt = pyplot()
    try:
        with atomic_write(path, "wb") as f:
            fig.savefig(f, dpi=dpi, format=os.path.splitext(os.fspath(path))[1][1:] or "png")
    finally:
        plt.close(fig)


# --- image grids and the denoising GIF -------------------------------------------------------------------
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
    grid = image_grid(x, nrow, pad, scale)
    plt = pyplot()
    with atomic_write(path, "wb") as f:
        plt.imsave(f, grid, cmap="gray", vmin=0.0, vmax=1.0, format="png")


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
    with atomic_write(path, "wb") as f:
        pics[0].save(f, format="GIF", save_all=True, append_images=pics[1:], duration=durations, loop=0)


# --- the ring experiment (report fig. 2.1) -------------------------------------------------------------------
def ring_figure(path, cfg, model, ema, sde, x, real, n_show=3000, n_traj=8):
    """Real vs generated points, a few reverse trajectories, the learned score at 3 times."""
    from .losses import score_fn_from_model
    from .samplers import euler_maruyama

    plt = pyplot()
    fig, ax = plt.subplots(1, 5, figsize=(22, 4.6))
    ax[0].scatter(*real[:n_show].T, s=1, alpha=0.5, label="real")
    ax[0].scatter(*x[:n_show].T, s=1, alpha=0.5, label="generated")
    ax[0].set_title(f"{cfg.data}: real vs generated ({cfg.sde}, {cfg.loss}, {cfg.sampler})")
    ax[0].legend(markerscale=8)
    ema.swap()
    try:
        score = score_fn_from_model(model, sde)
        _, traj = euler_maruyama(sde, score, (n_traj, 2), 200, np.random.default_rng(cfg.seed + 7),
                                 return_trajectory=True)
        ax[1].scatter(*real[:n_show].T, s=1, c="0.8")
        for i in range(n_traj):
            ax[1].plot(traj[:, i, 0], traj[:, i, 1], lw=0.6)
            ax[1].plot(*traj[-1, i], "k.", ms=4)
        ax[1].set_title("reverse trajectories (200 EM steps)")
        g = np.linspace(-2, 2, 21)
        grid = np.stack(np.meshgrid(g, g), -1).reshape(-1, 2)
        for j, t in enumerate([0.01 * sde.T, 0.1 * sde.T, 0.5 * sde.T]):
            s = score(grid, np.full(len(grid), t))
            n = np.linalg.norm(s, axis=1, keepdims=True) + 1e-12
            ax[2 + j].quiver(grid[:, 0], grid[:, 1], *(s / n).T, np.log(n[:, 0]), cmap="viridis")
            ax[2 + j].set_title(f"learned score direction, t = {t:.2f} (colour: log norm)")
    finally:
        ema.swap()
    for a in ax:
        a.set_aspect("equal")
        a.set_xlim(-2, 2), a.set_ylim(-2, 2)
    fig.tight_layout()
    save_figure(fig, path, dpi=80)


# --- the comparison (report figs. 3.4, 3.5) -------------------------------------------------------------------
def labels_figure(path, rows):
    """Predicted-label histograms side by side; rows: dicts with "row" and metrics["label_hist"]."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, 3.6))
    width = 0.8 / len(rows)
    for j, r in enumerate(rows):
        h = np.asarray(r["metrics"]["label_hist"], dtype=float)
        ax.bar(np.arange(10) + (j - (len(rows) - 1) / 2) * width, h / h.sum(), width, label=ROW_TITLES[r["row"]])
    ax.axhline(0.1, color="0.5", lw=0.8, ls="--")
    ax.set_xticks(range(10))
    ax.set_xlabel("predicted label")
    ax.set_ylabel("fraction of images")
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path, dpi=120)


def best_figure(path, rows):
    """The best image per predicted label per model (max logit above each); rows: dicts with
    "row" and "best" (refdiff.image_scores.best_per_label)."""
    plt = pyplot()
    fig, axes = plt.subplots(len(rows), 10, figsize=(10, 1.15 * len(rows) + 0.3), squeeze=False)
    for i, r in enumerate(rows):
        for k, (img, top) in enumerate(r["best"]):
            ax = axes[i, k]
            ax.set_xticks([]), ax.set_yticks([])
            if img is None:
                ax.text(0.5, 0.5, "none", ha="center", va="center", transform=ax.transAxes)
            else:
                ax.imshow(img, cmap="gray", vmin=-1, vmax=1)
                ax.set_title(f"{top:.1f}", fontsize=7)
            if k == 0:
                ax.set_ylabel(ROW_TITLES[r["row"]], fontsize=8)
    fig.suptitle("best image per predicted label (max logit above each)", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
