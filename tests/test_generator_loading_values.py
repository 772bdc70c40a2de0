"""Loading what a run wrote, by value: generate.load_generator gives back the weights that
were saved (the EMA weights or the live ones, as asked) and says which in its info, and
train.Trainer.on_disk names the checkpoint that is really on disk.
"""
from __future__ import annotations

import io as pyio
import os

import numpy as np
import pytest

from refdiff.checkpoint import CheckpointError, load_model, save_model
from refdiff.generate import load_generator
from refdiff.nn import make_model
from refdiff.optim import EMA
from refdiff.train import TrainConfig, Trainer


@pytest.fixture
def vae_checkpoint(tmp_path):
    m = make_model("vae", hidden=(3,), latent=2, seed=0)
    ema = EMA(m, 0.9)
    for k in ema.shadow:
        ema.shadow[k][...] = 0.5 * m.params[k] - 0.125           # the averaged weights differ from the live ones
    path = tmp_path / "checkpoint.npz"
    save_model(path, m, ema=ema, epoch=3)
    return str(path), {k: v.copy() for k, v in m.params.items()}, {k: v.copy() for k, v in ema.shadow.items()}


def test_load_generator_ema_or_live_weights(vae_checkpoint):
    # bug caught: use_ema ignored (or inverted), info claiming EMA weights that were not loaded
    path, live, averaged = vae_checkpoint
    model, meta, info = load_generator(path, "vae", use_ema=True)
    assert all(np.array_equal(model.params[k], averaged[k]) for k in live)
    assert info == dict(checkpoint=os.path.abspath(path), model="vae", kind="vae", epoch=3, ema=True)
    assert meta["epoch"] == 3
    model, _, info = load_generator(path, use_ema=False)
    assert all(np.array_equal(model.params[k], live[k]) for k in live) and info["ema"] is False


def test_load_generator_without_ema_and_refusals(tmp_path, vae_checkpoint):
    m = make_model("gan", z_dim=2, g_hidden=(3,), d_hidden=(3,), seed=1)
    save_model(tmp_path / "gan.npz", m, image_shape=[1, 28, 28])
    model, _, info = load_generator(str(tmp_path / "gan.npz"), "gan", use_ema=True)
    assert info["ema"] is False and all(np.array_equal(model.params[k], m.params[k]) for k in m.params)
    with pytest.raises(ValueError, match=r"--vae checkpoint .* holds a 'gan' model \(kind 'gan'\); expected kind 'vae'"):
        load_generator(str(tmp_path / "gan.npz"), "vae", label="--vae checkpoint")
    save_model(tmp_path / "bad.npz", m, image_shape=[1, 0, 28])
    with pytest.raises(CheckpointError, match="image_shape"):
        load_generator(str(tmp_path / "bad.npz"))
    with pytest.raises(FileNotFoundError, match="^--gan checkpoint .* does not exist$"):
        load_generator(str(tmp_path / "none.npz"), label="--gan checkpoint")


def test_trainer_on_disk_names_the_checkpoint_there(tmp_path):
    cfg = TrainConfig(model="mlp", model_args={"widths": [8]}, limit=8, epochs=1)
    t = Trainer(cfg, tmp_path, progress_stream=pyio.StringIO(), log=lambda s: None)
    assert t.on_disk() == "no checkpoint was written (the run stopped before its first epoch ended)"
    t.fit()
    path = os.path.join(tmp_path, "checkpoint.npz")
    assert t.on_disk() == f"the checkpoint of epoch 1 is intact in {path} (the last finite state)"
    assert load_model(path)[2]["epoch"] == 1                    # what it names is what is there
