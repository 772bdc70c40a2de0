"""The Trainer and the train / sample commands: checkpoint round trip, refusal of truncated,
tampered and foreign checkpoints, interrupt-then-resume equal to an uninterrupted run bit
for bit (eps, VAE and GAN objectives), and the commands end to end on tiny settings."""
import io
import json
import os
import re

import numpy as np
import pytest

from refdiff import checkpoint
from refdiff.cli import main
from refdiff.train import OBJECTIVES, TrainConfig, Trainer, get_objective

TINY_MLP = dict(data="mnist5k", model="mlp", model_args={"widths": [16]}, limit=100, batch=32)
TINY_UNET = dict(data="mnist5k", model="unet", limit=8, batch=4,
                 model_args={"channels": [4], "blocks": 1, "mid_channels": 4, "emb_dim": 8})
QUIET = dict(log=lambda s: None)


def trainer(out, resume=False, **kw):
    return Trainer(TrainConfig(**kw), out, resume=resume, progress_stream=io.StringIO(), **QUIET)


def all_arrays(path):
    arrays, meta = checkpoint.load(path)
    return arrays, meta


def assert_same_checkpoint(a, b):
    (xa, ma), (xb, mb) = all_arrays(a), all_arrays(b)
    assert sorted(xa) == sorted(xb)
    for k in xa:
        assert xa[k].dtype == xb[k].dtype and np.array_equal(xa[k], xb[k]), f"{k} differs"
    assert ma["epoch"] == mb["epoch"]
    for ha, hb in zip(ma["history"], mb["history"]):
        assert {k: v for k, v in ha.items() if k != "seconds"} == {k: v for k, v in hb.items() if k != "seconds"}


# --- checkpoints ------------------------------------------------------------------------------------------
def test_round_trip_and_metrics(tmp_path):
    t = trainer(tmp_path, epochs=1, **TINY_MLP)
    t.fit()
    model, sections, meta = checkpoint.load_model(tmp_path / "checkpoint.npz")
    for k, v in t.model.params.items():
        assert np.array_equal(model.params[k], v)
    ema_model, _, _ = checkpoint.load_model(tmp_path / "checkpoint.npz", use_ema=True)
    for k, v in t.objective.ema.shadow.items():
        assert np.array_equal(ema_model.params[k], v)
    assert not all(np.array_equal(ema_model.params[k], v) for k, v in t.model.params.items())
    assert meta["epoch"] == 1 and meta["image_shape"] == [1, 28, 28] and meta["ddpm_schedule"]["num_steps"] == 1000
    assert sections["optim"]["model/step"] == 4                       # ceil(100 / 32) Adam steps
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert len(m["history"]) == 1 and m["history"][0]["loss"] > 0 and m["seconds_per_epoch"] > 0


def _corrupt(path, how):
    data = bytearray(path.read_bytes())
    if how == "truncate":
        data = data[: len(data) // 2]
    else:                                   # flip one byte in the middle of the array data
        data[len(data) // 3] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("how,match", [("truncate", "corrupt or truncated"), ("tamper", "tampered|corrupt")])
def test_truncated_or_tampered_checkpoint_refused(tmp_path, capsys, how, match):
    assert main(["train", "--out", str(tmp_path), "--model", "mlp", "--model-arg", "widths=[16]",
                 "--limit", "40", "--epochs", "1"]) == 0
    _corrupt(tmp_path / "checkpoint.npz", how)
    capsys.readouterr()
    assert main(["train", "--out", str(tmp_path), "--model", "mlp", "--model-arg", "widths=[16]",
                 "--limit", "40", "--epochs", "2", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "error" in err and re.search(match, err), err
    assert main(["sample", "--checkpoint", str(tmp_path / "checkpoint.npz"), "--out", str(tmp_path / "s")]) == 2


def test_other_configuration_or_architecture_refused(tmp_path, capsys):
    trainer(tmp_path, epochs=1, **TINY_MLP).fit()
    with pytest.raises(checkpoint.CheckpointError, match=r"different configuration: model_args="):
        trainer(tmp_path, resume=True, epochs=2, **dict(TINY_MLP, model_args={"widths": [32]}))
    with pytest.raises(checkpoint.CheckpointError, match=r"lr=None there, 0.001 now"):
        trainer(tmp_path, resume=True, epochs=2, lr=1e-3, **TINY_MLP)
    # same training config, but the file holds another network (e.g. written by other code)
    from refdiff.nn import make_model
    arrays, meta = checkpoint.load(tmp_path / "checkpoint.npz")
    other = make_model("mlp", dim=784, widths=[8])
    checkpoint.save_model(tmp_path / "checkpoint.npz", other, **{k: v for k, v in meta.items()
                                                                   if k not in ("model", "format", "sha256")})
    with pytest.raises(checkpoint.CheckpointError, match="holds model"):
        trainer(tmp_path, resume=True, epochs=2, **TINY_MLP)


def test_existing_run_not_overwritten_without_resume(tmp_path, capsys):
    args = ["train", "--out", str(tmp_path), "--model", "mlp", "--model-arg", "widths=[8]", "--limit", "20",
            "--epochs", "1"]
    assert main(args) == 0
    assert main(args) == 2
    assert "pass --resume" in capsys.readouterr().err
    assert main(args + ["--resume"]) == 0
    assert "nothing to do" in capsys.readouterr().out


# --- resume, bit for bit ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw", [
    TINY_MLP,
    dict(TINY_MLP, loss="dsm", grad_clip=1.0),
    dict(data="mnist5k", model="gan", model_args={"g_hidden": [32], "d_hidden": [32]}, limit=70, batch=32),
    dict(data="mnist5k", model="vae", model_args={"hidden": [32], "latent": 4}, limit=70, batch=32),
], ids=["ddpm", "dsm+clip", "gan", "vae"])
def test_resume_is_bit_for_bit(tmp_path, kw):
    """2 epochs straight vs 1 epoch, a fresh process-like Trainer, then the 2nd: every array
    of the two checkpoints (weights, EMA, every optimizer's moments and step) is identical."""
    trainer(tmp_path / "a", epochs=2, **kw).fit()
    trainer(tmp_path / "b", epochs=1, **kw).fit()
    t = trainer(tmp_path / "b", resume=True, epochs=2, **kw)
    assert t.epoch == 1
    t.fit()
    assert_same_checkpoint(tmp_path / "a" / "checkpoint.npz", tmp_path / "b" / "checkpoint.npz")
    # and the test can fail: a different seed gives different weights
    trainer(tmp_path / "c", epochs=2, **dict(kw, seed=1)).fit()
    with pytest.raises(AssertionError):
        assert_same_checkpoint(tmp_path / "a" / "checkpoint.npz", tmp_path / "c" / "checkpoint.npz")


def test_resume_via_the_command(tmp_path):
    base = ["train", "--model", "mlp", "--model-arg", "widths=[8]", "--limit", "50", "--batch", "16"]
    assert main(base + ["--out", str(tmp_path / "a"), "--epochs", "2"]) == 0
    assert main(base + ["--out", str(tmp_path / "b"), "--epochs", "1"]) == 0
    assert main(base + ["--out", str(tmp_path / "b"), "--epochs", "2", "--resume"]) == 0
    assert_same_checkpoint(tmp_path / "a" / "checkpoint.npz", tmp_path / "b" / "checkpoint.npz")


def test_divergence_stops_without_touching_the_checkpoint(tmp_path, monkeypatch):
    t = trainer(tmp_path, epochs=1, **TINY_MLP)
    t.fit()
    before = (tmp_path / "checkpoint.npz").read_bytes()
    t = trainer(tmp_path, resume=True, epochs=2, **TINY_MLP)
    monkeypatch.setattr(t.objective, "step", lambda x, y, rng: {"loss": float("nan")})
    with pytest.raises(ValueError, match="diverged at epoch 2, step 1.*epoch 1 is intact"):
        t.fit()
    assert (tmp_path / "checkpoint.npz").read_bytes() == before


# --- objectives -----------------------------------------------------------------------------------------------
def test_objective_registry():
    assert set(OBJECTIVES) == {"eps", "vae", "gan", "classifier"}
    for kind in OBJECTIVES:
        cls = get_objective(kind)
        assert callable(getattr(cls, "step")) and callable(getattr(cls, "optimizers"))
    with pytest.raises(ValueError, match="no training objective"):
        get_objective("flow")


@pytest.mark.parametrize("cfg,match", [
    (dict(epochs=0), "epochs"), (dict(batch=0), "batch"), (dict(lr=-1.0), "lr"), (dict(ema_decay=1.5), "ema_decay"),
    (dict(dtype="float16"), "dtype"), (dict(limit=0), "limit"), (dict(grad_clip=float("nan")), "grad_clip"),
])
def test_bad_config(cfg, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**cfg).validate()


def test_bad_input_messages(tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path), "--data", f"idx:{tmp_path}/none", "--model", "mlp"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["train", "--out", str(tmp_path), "--model", "unet", "--model-arg", "image_size=32",
                 "--limit", "4"]) == 2
    assert "shape (1, 32, 32)" in capsys.readouterr().err
    assert main(["sample", "--checkpoint", str(tmp_path / "none.npz"), "--out", str(tmp_path)]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--out", str(tmp_path), "--loss", "mse"])


# --- the commands end to end ----------------------------------------------------------------------------------
def test_train_unet_then_sample_every_way(tmp_path):
    """A tiny UNet through `refdiff train`, then `refdiff sample` with each sampler."""
    out = tmp_path / "run"
    args = ["train", "--out", str(out), "--model", "unet", "--limit", "8", "--batch", "4", "--epochs", "1"]
    for k, v in TINY_UNET["model_args"].items():
        args += ["--model-arg", f"{k}={json.dumps(v)}"]
    assert main(args) == 0
    ck = str(out / "checkpoint.npz")
    for name, extra in (("ddim", ["--steps", "5", "--gif", "--frames", "3"]), ("em", ["--steps", "5"]),
                        ("ddim-eta", ["--steps", "4", "--eta", "1", "--spacing", "trailing", "--no-ema"])):
        d = tmp_path / name
        sampler = name.split("-")[0]
        assert main(["sample", "--checkpoint", ck, "--n", "3", "--sampler", sampler, "--out", str(d)] + extra) == 0
        x = np.load(d / "samples.npy")
        assert x.shape == (3, 1, 28, 28) and x.dtype == np.float32 and x.min() >= -1 and x.max() <= 1
        assert (d / "grid.png").stat().st_size > 0
        info = json.loads((d / "sample.json").read_text())
        assert info["sampler"] == sampler and info["ema"] == (name != "ddim-eta")
    from PIL import Image
    with Image.open(tmp_path / "ddim" / "denoise.gif") as im:
        assert im.n_frames == 3


def test_sample_ddpm_full_chain_is_reproducible(tmp_path):
    assert main(["train", "--out", str(tmp_path), "--model", "mlp", "--model-arg", "widths=[8]",
                 "--limit", "16", "--epochs", "1"]) == 0
    ck = str(tmp_path / "checkpoint.npz")
    for d in ("s1", "s2"):
        assert main(["sample", "--checkpoint", ck, "--n", "2", "--sampler", "ddpm", "--variance", "beta_tilde",
                     "--out", str(tmp_path / d), "--seed", "3"]) == 0
    assert np.array_equal(np.load(tmp_path / "s1" / "samples.npy"), np.load(tmp_path / "s2" / "samples.npy"))


@pytest.mark.parametrize("model,args", [("vae", ["hidden=[16]", "latent=2"]), ("gan", ["g_hidden=[8]", "d_hidden=[8]"])])
def test_train_and_sample_vae_gan(tmp_path, model, args, capsys):
    cmd = ["train", "--out", str(tmp_path), "--model", model, "--limit", "32", "--epochs", "1"]
    for a in args:
        cmd += ["--model-arg", a]
    assert main(cmd) == 0
    assert main(["sample", "--checkpoint", str(tmp_path / "checkpoint.npz"), "--n", "5",
                 "--out", str(tmp_path / "s")]) == 0
    x = np.load(tmp_path / "s" / "samples.npy")
    assert x.shape == (5, 1, 28, 28) and x.min() >= -1 and x.max() <= 1
    assert main(["sample", "--checkpoint", str(tmp_path / "checkpoint.npz"), "--gif",
                 "--out", str(tmp_path / "g")]) == 2
    assert "denoising chain" in capsys.readouterr().err


def test_classifier_trains_but_cannot_sample(tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path), "--model", "classifier", "--limit", "16", "--epochs", "1"]) == 0
    assert json.loads((tmp_path / "metrics.json").read_text())["history"][0]["acc"] >= 0
    assert main(["sample", "--checkpoint", str(tmp_path / "checkpoint.npz"), "--out", str(tmp_path / "s")]) == 2
    assert "cannot generate" in capsys.readouterr().err


def test_image_grid_layout():
    from refdiff.figures import image_grid
    x = np.stack([np.full((1, 2, 3), v) for v in (-1.0, 0.0, 3.0)])    # 3 images 2 x 3; 3.0 is clipped
    g = image_grid(x, nrow=2, pad=1)
    assert g.shape == (2 * 3 + 1, 2 * 4 + 1)
    assert np.all(g[1:3, 1:4] == 0) and np.all(g[1:3, 5:8] == 0.5) and np.all(g[4:6, 1:4] == 1)
    assert np.all(g[4:6, 5:8] == 0.5) and np.all(g[0] == 0.5)          # empty cell and padding: grey
    assert image_grid(x, scale=2).shape == (2 * 6 + 2, 2 * 8 + 2)      # nrow = ceil(sqrt(3)) = 2, pad 2
    with pytest.raises(ValueError, match="shape"):
        image_grid(np.zeros((2, 3, 4, 4)))
