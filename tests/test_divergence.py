"""Divergence is caught after the update that causes it, and never saved: real runs with a
learning rate far too large (no mocks), for `train` and `ring`, and the loss-explosion rule
of refdiff.optim.DivergenceGuard on sequences whose answer is known.

The runs were chosen by trying learning rates on a tiny MLP (16 images, batch 8, 2 steps per
epoch): lr 0.7 with seed 1 learns for one epoch, then its loss jumps to ~1e5 at the first
step of epoch 2; a 1-channel UNet at lr 10 overflows Adam's second moment at step 2 while
its loss is still finite (the case that used to freeze training and exit 0).
"""
import io
import json
import os
import warnings

import numpy as np
import pytest

from refdiff import checkpoint
from refdiff.cli import main
from refdiff.optim import DivergenceError, DivergenceGuard
from refdiff.train import TrainConfig, Trainer

UNSTABLE = dict(model="mlp", model_args={"widths": [16]}, limit=16, batch=8, lr=0.7, seed=1)
UNET = dict(model="unet", model_args={"channels": [4], "blocks": 1, "mid_channels": 4, "emb_dim": 8},
            limit=16, batch=8, lr=10.0)


def _trainer(out, epochs, **kw):
    return Trainer(TrainConfig(epochs=epochs, **kw), out, progress_stream=io.StringIO(), log=lambda s: None)


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)     # the overflows on the way to divergence
        yield


def test_train_divergence_keeps_the_last_finite_checkpoint(tmp_path):
    """The checkpoint left on disk is the one of epoch 1, bit for bit the same as a run told to
    stop after epoch 1, and finite (checkpoint.load checks every array)."""
    with pytest.raises(DivergenceError, match=r"diverged at epoch 2, step 1: the loss exploded .*"
                                              r"checkpoint of epoch 1 is intact"):
        _trainer(tmp_path / "a", 4, **UNSTABLE).fit()
    _trainer(tmp_path / "b", 1, **UNSTABLE).fit()
    xa, ma = checkpoint.load(tmp_path / "a" / "checkpoint.npz")
    xb, mb = checkpoint.load(tmp_path / "b" / "checkpoint.npz")
    assert ma["epoch"] == mb["epoch"] == 1 and sorted(xa) == sorted(xb)
    assert all(np.array_equal(xa[k], xb[k]) for k in xa)
    assert sorted(os.listdir(tmp_path / "a")) == ["checkpoint.npz", "metrics.json"]   # no lock, no temporaries


def test_adam_second_moment_overflow_stops_before_any_checkpoint(tmp_path):
    with pytest.raises(DivergenceError, match=r"epoch 1, step 2: .*second moment \(Adam v\).*"
                                              r"no checkpoint was written"):
        _trainer(tmp_path, 3, **UNET).fit()
    assert os.listdir(tmp_path) == []


def test_train_command_exits_1(tmp_path, capsys):
    argv = ["train", "--out", str(tmp_path), "--model", "unet", "--limit", "16", "--batch", "8", "--lr", "10",
            "--epochs", "2"]
    for k, v in UNET["model_args"].items():
        argv += ["--model-arg", f"{k}={json.dumps(v)}"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "refdiff train: error: training diverged" in err and "Traceback" not in err


@pytest.mark.parametrize("lr", ["1e3", "1e6"])
def test_ring_divergence_exits_1_and_writes_nothing(tmp_path, capsys, lr):
    """`ring --lr 1e3` once exited 0 with a loss of 7.6e23; 1e6 gave a traceback."""
    out = tmp_path / "ring"
    assert main(["ring", "--out", str(out), "--lr", lr, "--train-steps", "300", "--n", "50", "--steps", "5",
                 "--batch", "16", "--no-plot"]) == 1
    err = capsys.readouterr().err
    assert "ring training diverged at step" in err and "nothing was saved" in err
    assert os.listdir(out) == []


# --- the loss-explosion rule ----------------------------------------------------------------------------------
class _Flat:
    """A model and optimizer whose arrays stay finite: only the loss rule is exercised."""
    class ops:
        xp = np
    params = {"w": np.zeros(3)}


def _run(losses):
    g = DivergenceGuard(_Flat(), {})
    for i, loss in enumerate(losses):
        try:
            g.check({"loss": loss})
        except FloatingPointError:
            return i
    return None


def test_loss_rule_on_known_sequences():
    rng = np.random.default_rng(0)
    noisy = list(np.abs(1 + 0.5 * rng.standard_normal(2000)))          # a learning run's noise: never stops
    assert _run(noisy) is None
    assert _run([1.0] * 10 + [5e3, 1.0]) is None                       # a spike of 5e3 x: allowed
    assert _run([1.0] * 10 + [2e4]) == 10                              # 2e4 x the level: stopped at once
    climb = [1.0] * 100 + [1.2 ** k for k in range(200)]              # a slow climb is caught too
    assert _run(climb) == 100 + int(np.ceil(np.log(1e4) / np.log(1.2)))
    assert _run([1e-4] * 100 + [5.0]) is None                          # a tiny loss: the floor of 1 applies
    assert _run([-3.0] * 50 + [-4e4]) == 50                            # |loss|: SSM losses are negative
    assert _run([1.0, float("nan")]) == 1 and _run([float("inf")]) == 0


def test_non_finite_state_is_named():
    g = DivergenceGuard(_Flat(), {})
    _Flat.params["w"][1] = np.inf
    try:
        with pytest.raises(FloatingPointError, match="NaN or Inf in parameter 'w'"):
            g.check(1.0)
    finally:
        _Flat.params["w"][1] = 0.0
