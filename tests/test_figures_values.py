"""refdiff.figures by value: the PNG and GIF files read back with Pillow and compared with
grids built here by hand; the figures' artists (bar heights, images, titles, arrows) read
back from the matplotlib figure that `save_figure` receives.

Pixel values: pixels are chosen as k / 255 after the [-1, 1] -> [0, 1] map. The GIF writer's
round(255 v) gives back exactly k. matplotlib's grey colour map picks entry floor(256 v) of
256, whose value k / 255 it turns into a byte by truncation (uint8(255 * k / 255)), so some
k come back as k - 1: the PNG is compared to within one grey level (MPL_LEVEL). A layout or
scaling bug moves pixels by tens of levels; so does min-max rescaling of the third test
image (range 99..254).
"""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from refdiff import figures
from refdiff.nn import make_model
from refdiff.optim import EMA
from refdiff.ring import RingConfig
from refdiff.sde import make_sde

MPL_LEVEL = 1   # matplotlib's truncation of its colour table to bytes (module docstring)
PAD = 128       # 0.5 mid-grey, both by the colour map (floor(0.5 * 256)) and by round(255 * 0.5)


def _images(levels):
    """Images in [-1, 1] whose [0, 1] values are levels / 255 exactly (up to float rounding)."""
    return 2.0 * np.asarray(levels, dtype=np.float64) / 255.0 - 1.0


def _grid_by_hand(levels, nrow, pad, scale):
    """The uint8 grid of images `levels` (N, H, W): each pixel a scale x scale block, pad of 128."""
    n, h, w = levels.shape
    rows = -(-n // nrow)
    out = np.full((rows * (h * scale + pad) + pad, nrow * (w * scale + pad) + pad), PAD, dtype=np.int64)
    for k in range(n):
        r, c = divmod(k, nrow)
        top, left = pad + r * (h * scale + pad), pad + c * (w * scale + pad)
        out[top:top + h * scale, left:left + w * scale] = np.kron(levels[k], np.ones((scale, scale), np.int64))
    return out


LEVELS = np.array([[[0, 255], [10, 200]], [[37, 64], [250, 1]], [[99, 100], [101, 254]]])


def test_pyplot_is_agg():
    assert figures.pyplot().get_backend().lower() == "agg"


def test_save_grid_png_pixels(tmp_path):
    # bug caught: a row/column swap in the layout, the scale applied once, per-image min-max
    # rescaling (the report's mistake), the missing cell not grey
    p = tmp_path / "grid.png"
    figures.save_grid(p, _images(LEVELS)[:, None], nrow=2, pad=1, scale=2)
    png = np.asarray(Image.open(p).convert("RGBA")).astype(np.int64)
    expected = _grid_by_hand(LEVELS, nrow=2, pad=1, scale=2)
    assert png.shape == expected.shape + (4,)
    for ch in range(3):
        assert np.abs(png[..., ch] - expected).max() <= MPL_LEVEL
    assert np.all(png[..., 3] == 255)


def test_save_grid_clips_rather_than_rescales(tmp_path):
    p = tmp_path / "g.png"
    x = np.array([[[-3.0, 0.0], [2.0, 1.0]]])                  # out of range: clipped to -1 and 1
    figures.save_grid(p, x, nrow=1, pad=0, scale=1)
    png = np.asarray(Image.open(p).convert("L")).astype(np.int64)
    assert np.abs(png - [[0, 128], [255, 255]]).max() <= MPL_LEVEL


def test_save_gif_frames_and_timing(tmp_path):
    # bug caught: frames out of order or dropped, the last frame not held, no loop
    frames = np.stack([_images(LEVELS), _images(255 - LEVELS), _images(np.full_like(LEVELS, 77))])
    p = tmp_path / "d.gif"
    figures.save_gif(p, frames, nrow=3, pad=2, scale=1, duration_ms=50, hold_last_ms=900)
    im = Image.open(p)
    assert im.n_frames == 3 and im.info["loop"] == 0
    for f, lv in enumerate([LEVELS, 255 - LEVELS, np.full_like(LEVELS, 77)]):
        im.seek(f)
        assert np.array_equal(np.asarray(im.convert("L")).astype(np.int64), _grid_by_hand(lv, 3, 2, 1))
        assert im.info["duration"] == (900 if f == 2 else 50)


def test_save_figure_size_format_and_close(tmp_path):
    plt = figures.pyplot()
    fig = plt.figure(figsize=(2.0, 1.0))
    figures.save_figure(fig, tmp_path / "f.png", dpi=50)
    assert Image.open(tmp_path / "f.png").size == (100, 50)       # inches x dpi
    assert not plt.fignum_exists(fig.number)                     # closed: no figure leak over a run
    fig = plt.figure(figsize=(2.0, 1.0))
    figures.save_figure(fig, tmp_path / "f.svg", dpi=50)
    assert b"<svg" in (tmp_path / "f.svg").read_bytes()[:1000]    # the format follows the extension


@pytest.fixture
def captured(monkeypatch):
    """The figures handed to save_figure (which still writes and closes them)."""
    figs, real = [], figures.save_figure

    def keep(fig, path, dpi):
        figs.append(fig)
        real(fig, path, dpi)
    monkeypatch.setattr(figures, "save_figure", keep)
    return figs


def test_labels_figure_bars_are_normalised_histograms(tmp_path, captured):
    # bug caught: counts drawn instead of fractions, bars of two models on top of each other
    rows = [dict(row="real", metrics=dict(label_hist=[10] * 10)),
            dict(row="gan", metrics=dict(label_hist=[0, 0, 0, 30, 0, 0, 0, 10, 0, 0]))]
    figures.labels_figure(tmp_path / "labels.png", rows)
    assert (tmp_path / "labels.png").stat().st_size > 0
    ax = captured[0].axes[0]
    bars = ax.patches
    assert len(bars) == 20
    heights = np.array([b.get_height() for b in bars])
    assert np.allclose(heights[:10], 0.1) and np.allclose(heights[10:], [0, 0, 0, .75, 0, 0, 0, .25, 0, 0])
    centres = np.array([b.get_x() + b.get_width() / 2 for b in bars])
    assert np.allclose(centres[:10], np.arange(10) - 0.2) and np.allclose(centres[10:], np.arange(10) + 0.2)
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["real (held-out)", "GAN"]


def test_best_figure_cells(tmp_path, captured):
    rng = np.random.default_rng(0)
    imgs = [rng.uniform(-1, 1, (28, 28)) for _ in range(10)]
    best = [(imgs[k], 10.0 + k / 4) if k % 3 else (None, None) for k in range(10)]
    figures.best_figure(tmp_path / "best.png", [dict(row="vae", best=best), dict(row="ddpm", best=best)])
    axes = np.array(captured[0].axes).reshape(2, 10)
    for i in range(2):
        assert axes[i, 0].get_ylabel() == ("VAE", "DDPM")[i]
        for k in range(10):
            ax = axes[i, k]
            if k % 3:
                assert np.array_equal(ax.images[0].get_array(), imgs[k])
                assert ax.images[0].get_clim() == (-1, 1)            # never rescaled per image
                assert ax.get_title() == f"{10.0 + k / 4:.1f}"
            else:
                assert not ax.images and [t.get_text() for t in ax.texts] == ["none"]


def test_ring_figure_draws_the_ema_score(tmp_path, captured):
    # The EMA weights give eps = b for every input (all weights 0, the last bias b), so the
    # learned score is -b / std(t): direction -b / |b| everywhere, colour log(|b| / std(t)),
    # with VP's std(t)^2 = 1 - exp(-(b_min t + (b_max - b_min) t^2 / 2)). The live weights are
    # random: a figure drawn with them (the EMA not swapped in) has other arrows.
    cfg = RingConfig(sde="vp", seed=3)
    sde = make_sde("vp", beta_min=0.1, beta_max=20.0)
    model = make_model("mlp", dim=2, widths=(4,), time_scale=1000.0, seed=0)
    ema = EMA(model, 0.9)
    for k in ema.shadow:
        ema.shadow[k][...] = 0
    ema.shadow["out.bias"][...] = [0.3, -0.4]
    live = {k: v.copy() for k, v in model.params.items()}
    rng = np.random.default_rng(1)
    real, x = rng.standard_normal((50, 2)), rng.standard_normal((40, 2))
    figures.ring_figure(tmp_path / "ring.png", cfg, model, ema, sde, x, real, n_show=30, n_traj=3)
    assert Image.open(tmp_path / "ring.png").size == (22 * 80, int(4.6 * 80))
    assert all(np.array_equal(model.params[k], v) for k, v in live.items())    # swapped back
    ax = captured[0].axes
    assert len(ax) == 5
    assert np.array_equal(ax[0].collections[0].get_offsets(), real[:30])
    assert np.array_equal(ax[0].collections[1].get_offsets(), x[:30])
    assert len(ax[1].lines) == 2 * 3                               # a path and an end point per trajectory
    for j, t in enumerate([0.01, 0.1, 0.5]):
        q = ax[2 + j].collections[0]
        assert q.U.shape == (441,)
        np.testing.assert_allclose(q.U, -0.6, rtol=1e-6)            # float32 network output
        np.testing.assert_allclose(q.V, 0.8, rtol=1e-6)
        std = np.sqrt(-np.expm1(-(0.1 * t + 19.9 * t * t / 2)))
        np.testing.assert_allclose(q.get_array(), np.log(0.5 / std), rtol=1e-6)
