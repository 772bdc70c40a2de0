"""End to end on the real class-conditional network: a tiny `unet-ddpm` (num_classes 10,
dropout on) trained 2 steps by the Trainer with v-prediction, label dropout 0.1, warm-up and
cosine lr, then sampled through the command with --class and --guidance. So that the labels
change the output at once: no zero init, and 2 groups per GroupNorm (with one channel per
group, max_groups >= channels, the norm after the embedding's per-channel shift removes it).

Checks: the checkpoint records the target and the conditioning; guided sampling writes the
images and labels.npy; guidance 0 equals the unconditional sampling and 1 the network given
the labels (an independent wrapper: the labels passed by hand, v converted by hand), exactly;
a class outside the trained range and --guidance on an unconditional checkpoint are refused;
the loaded v-network's forward_jvp (for the likelihood) is the derivative of its forward
(central difference of a float64 network: the JVP is exact up to the difference's O(h^2)
error; h = 1e-5 keeps it and rounding (1e-16 / h) below 1e-8)."""
import io
import json

import numpy as np
import pytest

from refdiff import checkpoint, prediction as P
from tests.helpers import assert_fd, fd_tangent
from refdiff.cli import main
from refdiff.generate import generate, load_generator
from refdiff.train import TrainConfig, Trainer

TINY = dict(data="mnist5k", model="unet-ddpm", model_args=dict(channels=[4, 8], attention=[1], num_classes=10, zero_init=False,
                                                   max_groups=2),
            limit=8, batch=4, epochs=1, dtype="float64", pred="v", label_dropout=0.1, warmup=1,
            lr_schedule="cosine", schedule="cosine")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cond")
    t = Trainer(TrainConfig(**TINY), out, progress_stream=io.StringIO(), log=lambda s: None)
    assert t.total_steps == 2 and getattr(t.model, "uses_dropout", False)
    t.fit()
    return out


def test_checkpoint_records_target_and_conditioning(run):
    _, meta = checkpoint.load(run / "checkpoint.npz")
    assert meta["prediction"] == "v" and meta["model"]["config"]["num_classes"] == 10
    assert meta["ddpm_schedule"]["kind"] == "cosine"
    assert meta["train_config"]["label_dropout"] == 0.1 and meta["train_config"]["lr_schedule"] == "cosine"
    model, _, info = load_generator(str(run / "checkpoint.npz"))
    assert isinstance(model, P.EpsModel) and model.pred == "v" and info["prediction"] == "v"


def test_guided_sampling_through_the_command(run, tmp_path):
    out = tmp_path / "s"
    assert main(["sample", "--checkpoint", str(run / "checkpoint.npz"), "--class", "0,3", "--guidance", "2",
                 "--n", "4", "--sampler", "ddim", "--steps", "3", "--batch", "3", "--out", str(out)]) == 0
    assert np.load(out / "labels.npy").tolist() == [0, 0, 3, 3]
    x = np.load(out / "samples.npy")
    assert x.shape == (4, 1, 28, 28) and np.all(np.isfinite(x))
    info = json.loads((out / "sample.json").read_text())
    assert info["classes"] == [0, 3] and info["guidance"] == 2.0 and info["prediction"] == "v"


class _Given:
    """The raw network with the labels passed by hand, v converted to eps by hand (float64)."""

    kind = "eps"

    def __init__(self, net, labels, schedule):
        self.net, self.labels, self.schedule = net, labels, schedule
        self.name, self.dtype, self.ops, self.config = net.name, net.dtype, net.ops, net.config

    def forward(self, x, t):
        ab = P.abar_at(self.schedule, t).reshape(-1, 1, 1, 1)
        v = self.net.forward(x, t, y=self.labels)
        return np.sqrt(1 - ab) * x + np.sqrt(ab) * v


def test_guidance_0_and_1_on_the_real_network(run):
    from refdiff.ddpm import schedule_from_meta
    model, meta, _ = load_generator(str(run / "checkpoint.npz"))
    labels, args = np.array([1, 7, 7]), dict(sampler="ddim", steps=3)
    uncond = generate(model, meta, 3, np.random.default_rng(0), **args)[0]
    w0 = generate(model, meta, 3, np.random.default_rng(0), labels=labels, guidance=0.0, **args)[0]
    assert np.array_equal(w0, uncond)
    w1 = generate(model, meta, 3, np.random.default_rng(0), labels=labels, guidance=1.0, **args)[0]
    by_hand = generate(_Given(model.net, labels, schedule_from_meta(meta)), meta, 3, np.random.default_rng(0),
                       **args)[0]
    np.testing.assert_allclose(w1, by_hand, rtol=0, atol=1e-6)      # float32 images; the conversion's rounding
    assert not np.array_equal(w1, w0)


def test_refusals(run, tmp_path, capsys):
    ckpt = str(run / "checkpoint.npz")
    assert main(["sample", "--checkpoint", ckpt, "--class", "10", "--out", str(tmp_path / "a")]) == 2
    assert "--class 10 is outside the trained classes [0, 9]" in capsys.readouterr().err
    assert main(["train", "--out", str(run), "--resume", "--model", "unet-ddpm", "--limit", "8"]) == 2
    assert "cannot resume" in capsys.readouterr().err


def test_forward_jvp_of_the_loaded_v_network(run):
    model, _, _ = load_generator(str(run / "checkpoint.npz"))
    rng = np.random.default_rng(0)
    x, v, t = rng.standard_normal((2, 1, 28, 28)), rng.standard_normal((2, 1, 28, 28)), np.array([0.3, 0.8])
    e, de = model.forward_jvp(x, t, v)
    np.testing.assert_array_equal(e, model.forward(x, t))
    # central differences with the suite's step and their derived rounding bound (tests/helpers.py)
    assert_fd(de, fd_tangent(lambda z: model.forward(z, t), x, v), "JVP of the loaded v-network")
