"""Figures for the 2-D experiments (matplotlib, Agg backend: no display needed)."""
from __future__ import annotations

import numpy as np


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def ring_figure(path, cfg, model, ema, sde, x, real, n_show=3000, n_traj=8):
    """Real vs generated points, a few reverse trajectories, the learned score at 3 times."""
    from .losses import score_fn_from_model
    from .samplers import SAMPLERS, euler_maruyama

    plt = _plt()
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
    fig.savefig(path, dpi=80)
    plt.close(fig)
