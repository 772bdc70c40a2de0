"""The report's ring experiment (§2.5.1, fig. 2.1), done correctly.

Train a time-conditioned MLP noise predictor on 2-D data with a continuous loss
(DSM by default), sample with the reverse-time SDE from fresh prior noise, and score the
samples against independent real samples with the Fréchet distance and the sliced
Wasserstein distance, next to the same distances between two independent real samples
(the noise floor). The report's code reused the forward end-points of the data as the
starting points of the reverse run, so its samples were not new; ours are.

    run(cfg, out_dir)              the whole experiment into out_dir (what `refdiff ring` does):
                                   checkpoint.npz, metrics.json, samples.npy, ring.png
    train(cfg) -> model, ema, sde, loss history
    sample_and_score(cfg, model, ema, sde) -> samples, one real set, metrics, sampling seconds

Training stops with DivergenceError (refdiff.optim.DivergenceGuard: non-finite loss,
weights or Adam moments, or an exploding loss) before anything is written.
"""
from __future__ import annotations

import dataclasses
import os
import time

import numpy as np

from . import checkpoint, io, losses, metrics, samplers
from .data import make_toy
from .nn import make_model
from .optim import EMA, Adam, DivergenceError, DivergenceGuard
from .sde import make_sde

OUTPUTS = ("checkpoint.npz", "metrics.json", "samples.npy", "ring.png")

SDE_DEFAULTS = {
    "ou": dict(beta=5.0),                       # e^{-5} = 0.007: p_T close to N(0, I)
    "vp": dict(beta_min=0.1, beta_max=20.0),
    "subvp": dict(beta_min=0.1, beta_max=20.0),
    "ve": dict(sigma_min=0.01, sigma_max=4.0),  # sigma_max ~ the data's diameter
}


@dataclasses.dataclass
class RingConfig:
    data: str = "ring"            # ring | moons | swiss_roll | gmm
    sde: str = "vp"               # ou | vp | ve | subvp
    loss: str = "dsm"             # any key of refdiff.losses.LOSSES
    sampler: str = "em"           # em | pc | ode (refdiff.samplers.SAMPLERS)
    steps: int = 1000             # reverse-time steps
    train_steps: int = 3000       # Adam steps
    batch: int = 1024
    lr: float = 2e-3              # cosine-decayed to lr/20 over train_steps
    widths: tuple = (128, 128)
    ema_decay: float = 0.999
    n: int = 20000                # generated (and real) points scored
    floor_pairs: int = 16         # real sets averaged on both sides (see sample_and_score)
    seed: int = 0
    backend: str = "numpy"

    def validate(self):
        for name in ("steps", "train_steps", "batch", "n", "floor_pairs", "seed"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise ValueError(f"{name} must be an integer; got {v!r}")
            if v < (0 if name == "seed" else 1):
                raise ValueError(f"{name} must be >= {0 if name == 'seed' else 1}; got {v}")
        if self.n < 3:
            raise ValueError(f"n must be >= 3 to fit a covariance; got {self.n}")
        for name, lo, hi in (("lr", 0, np.inf), ("ema_decay", 0, 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float, np.floating)) or not np.isfinite(v) \
                    or not (lo < v <= hi if name == "lr" else lo <= v <= hi):
                raise ValueError(f"{name} must be a finite number in {'(0, inf)' if name == 'lr' else '[0, 1]'}; "
                                 f"got {v!r}")
        if not isinstance(self.widths, (tuple, list)) or not self.widths or not all(
                isinstance(w, (int, np.integer)) and not isinstance(w, bool) and w >= 1 for w in self.widths):
            raise ValueError(f"widths must be a non-empty sequence of integers >= 1; got {self.widths!r}")
        if self.sde not in SDE_DEFAULTS:
            raise ValueError(f"sde must be one of {sorted(SDE_DEFAULTS)}; got {self.sde!r}")
        if self.loss not in losses.LOSSES:
            raise ValueError(f"loss must be one of {sorted(losses.LOSSES)}; got {self.loss!r}")
        if self.sampler not in samplers.SAMPLERS:
            raise ValueError(f"sampler must be one of {sorted(samplers.SAMPLERS)}; got {self.sampler!r}")
        make_toy(self.data)
        self.check_memory()
        return self

    def memory_bytes(self):
        """A generous estimate of the peak memory: per point of a batch, the MLP's float32
        activations and caches (~6 arrays per layer); per scored point, the float64 samples,
        the sampler's state and three real sets."""
        per_point = 4 * 6 * (sum(self.widths) + 192) + 8 * 2 * 8
        return max(self.n, self.batch) * per_point

    def check_memory(self):
        """MemoryError, before any work, if memory_bytes() exceeds this machine's memory."""
        io.require_memory(self.memory_bytes(), f"--n {self.n} and --batch {self.batch}")


def train(cfg, progress=None):
    """-> (model, ema, sde, loss history). Data are drawn fresh each step (infinite data).
    DivergenceError if the run diverges (refdiff.optim.DivergenceGuard)."""
    rng = np.random.default_rng([cfg.seed, 1])
    sde = make_sde(cfg.sde, **SDE_DEFAULTS[cfg.sde])
    draw = make_toy(cfg.data)
    model = make_model("mlp", dim=2, widths=cfg.widths, time_scale=1000.0 / sde.T,
                       seed=cfg.seed, backend=cfg.backend)
    opt, ema = Adam(model, lr=cfg.lr), EMA(model, cfg.ema_decay)
    guard = DivergenceGuard(model, {"model": opt})
    loss_fn, history = losses.LOSSES[cfg.loss], []
    for k in range(cfg.train_steps):
        opt.lr = cfg.lr * (0.05 + 0.95 * 0.5 * (1 + np.cos(np.pi * k / cfg.train_steps)))
        model.zero_grad()
        loss = loss_fn(model, sde, draw(cfg.batch, rng), rng)
        if np.isfinite(loss):
            opt.step()
        try:
            guard.check(loss)
        except FloatingPointError as exc:
            raise DivergenceError(f"ring training diverged at step {k + 1} of {cfg.train_steps}: {exc}; nothing "
                                  f"was saved (lower --lr)") from None
        ema.update()
        history.append(loss)
        if progress is not None:
            progress.update(k + 1, loss=float(np.mean(history[-100:])))
    return model, ema, sde, history


def sample_and_score(cfg, model, ema, sde):
    """Sample cfg.n points with the EMA weights and score them against real sets.
    -> (samples (n, 2), the last real set drawn (n, 2), metrics dict, sampling seconds)."""
    ema.swap()
    try:
        score_fn = losses.score_fn_from_model(model, sde)
        rng = np.random.default_rng([cfg.seed, 2])
        t0 = time.perf_counter()
        x = samplers.SAMPLERS[cfg.sampler](sde, score_fn, (cfg.n, 2), cfg.steps, rng)
        sample_s = time.perf_counter() - t0
    finally:
        ema.swap()
    # Distances are noisy at any n: the FD between two independent sets of 20,000 ring
    # points varies by 3x from draw to draw (mean over 4 pairs: 7.6e-5 with one seed,
    # 2.0e-4 with others). So both sides are averaged the same way, over `floor_pairs`
    # real sets: generated vs each real set, and as many real-vs-real pairs. The O(n^2)
    # energy distance uses the first 4 only.
    draw, rng_real = make_toy(cfg.data), np.random.default_rng([cfg.seed, 3])
    proj = lambda: np.random.default_rng([cfg.seed, 4])  # same directions for every SW
    fns = {"frechet_distance": metrics.frechet_distance,
           "sliced_wasserstein": lambda a, b: metrics.sliced_wasserstein(a, b, 256, proj()),
           "energy_distance": metrics.energy_distance}
    gen, floor = {k: [] for k in fns}, {k: [] for k in fns}
    for i in range(cfg.floor_pairs):
        real, a, b = draw(cfg.n, rng_real), draw(cfg.n, rng_real), draw(cfg.n, rng_real)
        for k, fn in fns.items():
            if k == "energy_distance" and i >= 4:
                continue
            gen[k].append(fn(x, real))
            floor[k].append(fn(a, b))
    out = {}
    for k in fns:
        out[k] = float(np.mean(gen[k]))
        out[k + "_real_vs_real"] = float(np.mean(floor[k]))
        out[k + "_ratio"] = out[k] / out[k + "_real_vs_real"]
    return x, real, out, sample_s


def save_checkpoint(path, cfg, model, ema, history):
    checkpoint.save_model(path, model, ema=ema, config=dataclasses.asdict(cfg),
                          final_loss=float(np.mean(history[-100:])))


def run(cfg, out_dir, force=False, plot=True, progress=None, log=None):
    """The whole experiment into `out_dir` (OUTPUTS), holding its RunLock; -> metrics.
    An existing run there is refused unless `force`. Every file is written atomically, after
    training and sampling succeeded (a diverged or interrupted run writes nothing)."""
    cfg.validate()
    with io.output_run(out_dir, log=log) as out:
        existing = [f for f in OUTPUTS if os.path.lexists(os.path.join(out, f))]
        if existing and not force:
            raise ValueError(f"{out!r} already holds a ring run ({', '.join(existing)}): pass --force to "
                             f"overwrite it, or choose another --out")
        t0 = time.perf_counter()
        model, ema, sde, history = train(cfg, progress)
        train_s = time.perf_counter() - t0
        x, real, m, sample_s = sample_and_score(cfg, model, ema, sde)
        m.update(n=cfg.n, train_seconds=train_s, sample_seconds=sample_s, seed=cfg.seed,
                 config=dataclasses.asdict(cfg), final_loss=float(sum(history[-100:]) / min(100, len(history))))
        save_checkpoint(os.path.join(out, "checkpoint.npz"), cfg, model, ema, history)
        io.write_json(os.path.join(out, "metrics.json"), m)
        io.save_npy(os.path.join(out, "samples.npy"), x)
        if plot:
            from .figures import ring_figure
            ring_figure(os.path.join(out, "ring.png"), cfg, model, ema, sde, x, real)
    return m
