"""refdiff.ring's pieces by value.

sample_and_score on sets whose distances are known in closed form: every real set is one
fixed cloud P, the second set of each real-vs-real pair is P + s_b, and the (stubbed)
sampler returns P + s_x with s_x parallel to s_b. A translate has the same covariance, so
the Fréchet distance is |s|^2 exactly (up to sqrtm's rounding); the sliced Wasserstein
distance (p = 1) is mean_u |u.s| over its directions, so with the same directions on both
sides the ratio is |s_x| / |s_b| exactly. Bugs caught: the EMA weights not swapped in for
sampling (or not swapped back), the directions redrawn between the two sides, a ratio
inverted, a wrong seed stream handed to the sampler.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from refdiff import checkpoint, io, metrics, ring, samplers
from refdiff.nn import make_model
from refdiff.optim import EMA
from refdiff.sde import make_sde

# sqrtm of the product of two equal 2 x 2 covariances of size ~1: rounding of a few ulps
# of the trace, far below the |s|^2 ~ 0.1 compared
FD_ATOL = 1e-9


def _model_and_ema():
    model = make_model("mlp", dim=2, widths=(4,), time_scale=1.0, seed=0)
    ema = EMA(model, 0.9)
    for k in ema.shadow:
        ema.shadow[k][...] = 0.5 * model.params[k] + 0.25          # differs from the live weights
    return model, ema


def test_sample_and_score_closed_form(monkeypatch):
    cfg = ring.RingConfig(n=300, floor_pairs=3, steps=7, seed=11)
    model, ema = _model_and_ema()
    live = {k: v.copy() for k, v in model.params.items()}
    averaged = {k: v.copy() for k, v in ema.shadow.items()}
    cloud = np.random.default_rng(0).standard_normal((cfg.n, 2)) @ np.array([[1.0, 0.3], [0.0, 0.7]])
    s_x, s_b = np.array([0.3, -0.4]), np.array([0.15, -0.2])            # |s_x| = 0.5 = 2 |s_b|
    calls = {"draw": 0}

    def draw(n, rng):                        # real, a, b per pair: P, P, P + s_b
        calls["draw"] += 1
        return cloud + (s_b if calls["draw"] % 3 == 0 else 0.0)
    monkeypatch.setattr(ring, "make_toy", lambda name: draw)
    seen = {}

    def sampler(sde, score_fn, shape, steps, rng):
        seen.update(shape=shape, steps=steps, first=rng.random(),
                    ema_in=all(np.array_equal(model.params[k], v) for k, v in averaged.items()))
        return cloud + s_x
    monkeypatch.setitem(samplers.SAMPLERS, cfg.sampler, sampler)
    x, real, out, seconds = ring.sample_and_score(cfg, model, ema, make_sde("vp"))
    assert seen == dict(shape=(300, 2), steps=7, first=np.random.default_rng([11, 2]).random(), ema_in=True)
    assert all(np.array_equal(model.params[k], v) for k, v in live.items())          # swapped back
    assert np.array_equal(x, cloud + s_x) and np.array_equal(real, cloud) and seconds >= 0
    assert calls["draw"] == 3 * cfg.floor_pairs
    assert out["frechet_distance"] == pytest.approx(0.25, abs=FD_ATOL)
    assert out["frechet_distance_real_vs_real"] == pytest.approx(0.0625, abs=FD_ATOL)
    assert out["frechet_distance_ratio"] == pytest.approx(4.0, rel=1e-7)
    assert out["sliced_wasserstein_ratio"] == pytest.approx(2.0, rel=1e-12)
    # mean |u.s| over unit directions: between 0 and |s|, about 2|s|/pi for many directions
    assert 0.25 < out["sliced_wasserstein"] < 0.4
    ed = metrics.energy_distance(cloud + s_x, cloud)
    assert out["energy_distance"] == pytest.approx(ed, rel=1e-12)
    assert out["energy_distance_ratio"] == pytest.approx(ed / metrics.energy_distance(cloud, cloud + s_b), rel=1e-12)


def test_memory_bytes_by_hand_and_check_memory(monkeypatch):
    # per point: 4 bytes x 6 arrays x (128 + 128 + 192) activations + 8 bytes x 2 coords x 8 arrays
    cfg = ring.RingConfig()
    assert cfg.memory_bytes() == 20000 * (4 * 6 * 448 + 128)
    assert ring.RingConfig(n=10, batch=1000).memory_bytes() == ring.RingConfig(n=1000, batch=10).memory_bytes()
    monkeypatch.setattr(io, "physical_memory", lambda: cfg.memory_bytes())
    cfg.check_memory()                                           # exactly fits
    with pytest.raises(MemoryError, match="--n 20001 and --batch 1024 need about"):
        ring.RingConfig(n=20001).check_memory()


def test_save_checkpoint_round_trip(tmp_path):
    # bug caught: the live weights saved as EMA (or the reverse), final_loss over the whole history
    cfg = ring.RingConfig(widths=(4,), seed=5)
    model, ema = _model_and_ema()
    history = [1000.0] * 50 + [1.0, 3.0] * 50                    # the last 100 average to 2
    path = tmp_path / "checkpoint.npz"
    ring.save_checkpoint(path, cfg, model, ema, history)
    m2, sections, meta = checkpoint.load_model(path)
    assert all(np.array_equal(m2.params[k], model.params[k]) for k in model.params)
    assert all(np.array_equal(sections["ema"][k], ema.shadow[k]) for k in ema.shadow)
    assert meta["final_loss"] == 2.0
    assert meta["config"] == {**dataclasses.asdict(cfg), "widths": [4]}      # JSON has lists, not tuples
