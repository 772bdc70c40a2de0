"""The training recipe knobs: the learning-rate schedule (refdiff.optim.lr_factor) by closed
form, the lr Adam really uses, a resumed run continuing the same schedule bit for bit, the
prediction target and conditioning recorded in the checkpoint, and their bad values.

Closed forms (W warm-up steps, S total steps, k the 0-based update index):
warm-up (k + 1) / W; constant 1; cosine (1 + cos(pi (k - W) / (S - W))) / 2, 0 from k = S.
Values are compared to 1e-15 (a few ulps of numbers <= 1)."""
import io
import math

import numpy as np
import pytest

from refdiff import checkpoint
from refdiff.optim import Adam, lr_factor
from refdiff.train import TrainConfig, Trainer

TINY_MLP = dict(data="mnist5k", model="mlp", model_args={"widths": [16]}, limit=100, batch=32)   # 4 steps an epoch


def trainer(out, resume=False, **kw):
    return Trainer(TrainConfig(**kw), out, resume=resume, progress_stream=io.StringIO(), log=lambda s: None)


def test_warmup_and_constant():
    assert [lr_factor(k, 4) for k in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert all(lr_factor(k) == 1.0 for k in range(100))                     # no schedule: exactly 1


def test_cosine_closed_form():
    W, S = 10, 110
    for k in (10, 35, 60, 85, 109):
        assert lr_factor(k, W, "cosine", S) == pytest.approx(0.5 * (1 + math.cos(math.pi * (k - W) / 100)), abs=1e-15)
    assert lr_factor(10, W, "cosine", S) == 1.0                              # the end of the warm-up
    assert lr_factor(60, W, "cosine", S) == pytest.approx(0.5, abs=1e-15)    # half way
    assert lr_factor(110, W, "cosine", S) == 0.0 and lr_factor(500, W, "cosine", S) == 0.0
    assert lr_factor(3, W, "cosine", S) == 0.4                               # warm-up first
    assert [lr_factor(k, 0, "cosine", 4) for k in range(4)] == pytest.approx(
        [1.0, (1 + math.cos(math.pi / 4)) / 2, 0.5, (1 + math.cos(3 * math.pi / 4)) / 2], abs=1e-15)


@pytest.mark.parametrize("args,match", [((0, 0, "linear", 10), "lr_schedule"), ((0, 5, "cosine", 5), "total"),
                                        ((0, 0, "cosine", None), "total")])
def test_bad_schedules(args, match):
    with pytest.raises(ValueError, match=match):
        lr_factor(*args)


def test_adam_uses_the_scheduled_lr():
    """Adam's first update moves each weight by lr (m / sqrt(v) = sign(g) at step 1, eps aside):
    with warm-up 4 the first step moves by lr / 4."""
    from refdiff.nn import make_model
    moved = []
    for sched in (None, lambda k: lr_factor(k, 4)):
        m = make_model("mlp", dim=4, widths=(3,), dtype=np.float64, seed=0)
        before = {k: p.copy() for k, p in m.params.items()}
        for g in m.grads.values():
            g[...] = 1.0
        opt = Adam(m, lr=1e-2, lr_schedule=sched)
        assert opt.current_lr() == (1e-2 if sched is None else 2.5e-3)
        opt.step()
        moved.append(max(float(np.max(np.abs(m.params[k] - before[k]))) for k in before))
    assert moved[0] == pytest.approx(1e-2, rel=1e-6) and moved[1] == pytest.approx(2.5e-3, rel=1e-6)


def test_trainer_runs_the_schedule_over_the_whole_run(tmp_path):
    t = trainer(tmp_path, epochs=3, warmup=2, lr_schedule="cosine", **TINY_MLP)
    assert t.total_steps == 12
    lrs = []
    opt = t.objective.optimizers()["model"]
    real = opt.step

    def step():
        lrs.append(opt.current_lr())
        real()
    opt.step = step
    t.fit()
    want = [1e-4 * lr_factor(k, 2, "cosine", 12) for k in range(12)]
    assert lrs == pytest.approx(want, rel=1e-15, abs=0)
    _, meta = checkpoint.load(tmp_path / "checkpoint.npz")
    assert meta["train_config"]["warmup"] == 2 and meta["train_config"]["lr_schedule"] == "cosine"


def _killed_after_first_epoch(out, **cfg):
    """A 2-epoch run stopped (as by Ctrl-C) at the first step of epoch 2: epoch 1's checkpoint is on disk."""
    t = trainer(out, epochs=2, **cfg)
    real, calls = t.objective.step, []

    def step(*a):
        if len(calls) == t.total_steps // 2:
            raise KeyboardInterrupt
        calls.append(1)
        return real(*a)
    t.objective.step = step
    with pytest.raises(KeyboardInterrupt):
        t.fit()


@pytest.mark.parametrize("kw", [dict(warmup=3, lr_schedule="cosine"), dict(warmup=5, pred="v"),
                                dict(pred="x0", schedule="cosine")], ids=["cosine", "warmup+v", "x0+cosine-chain"])
def test_resume_continues_the_same_schedule_bit_for_bit(tmp_path, kw):
    from tests.test_train import assert_same_checkpoint
    cfg = dict(TINY_MLP, **kw)
    trainer(tmp_path / "a", epochs=2, **cfg).fit()
    _killed_after_first_epoch(tmp_path / "b", **cfg)
    t = trainer(tmp_path / "b", resume=True, epochs=2, **cfg)
    assert t.epoch == 1
    assert t.objective.optimizers()["model"].current_lr() == pytest.approx(
        1e-4 * lr_factor(4, kw.get("warmup", 0), kw.get("lr_schedule", "constant"), 8), rel=1e-15)
    t.fit()
    assert_same_checkpoint(tmp_path / "a" / "checkpoint.npz", tmp_path / "b" / "checkpoint.npz")
    _, meta = checkpoint.load(tmp_path / "a" / "checkpoint.npz")
    assert meta["prediction"] == kw.get("pred", "eps")


def test_default_run_is_unchanged_by_the_knobs(tmp_path):
    """warmup 0, constant, eps, no labels: the same weights as the options' explicit defaults
    and a different run with a warm-up (the test can fail)."""
    from tests.test_train import assert_same_checkpoint
    trainer(tmp_path / "a", epochs=1, **TINY_MLP).fit()
    trainer(tmp_path / "b", epochs=1, warmup=0, lr_schedule="constant", pred="eps", label_dropout=0.0,
            **TINY_MLP).fit()
    assert_same_checkpoint(tmp_path / "a" / "checkpoint.npz", tmp_path / "b" / "checkpoint.npz")
    trainer(tmp_path / "c", epochs=1, warmup=2, **TINY_MLP).fit()
    with pytest.raises(AssertionError):
        assert_same_checkpoint(tmp_path / "a" / "checkpoint.npz", tmp_path / "c" / "checkpoint.npz")


def test_resume_refuses_another_target_or_a_bent_cosine(tmp_path):
    trainer(tmp_path / "a", epochs=1, pred="v", **TINY_MLP).fit()
    with pytest.raises(checkpoint.CheckpointError, match="pred='v' there, 'eps' now"):
        trainer(tmp_path / "a", resume=True, epochs=2, **TINY_MLP)
    trainer(tmp_path / "b", epochs=1, lr_schedule="cosine", **TINY_MLP).fit()
    with pytest.raises(checkpoint.CheckpointError, match="cosine lr schedule decays over epochs=1"):
        trainer(tmp_path / "b", resume=True, epochs=2, lr_schedule="cosine", **TINY_MLP)


def test_a_checkpoint_from_before_the_knobs_resumes(tmp_path):
    """A train_config without the new keys ran with their defaults: it resumes."""
    import json
    from tests.test_cli_errors import _write_raw
    trainer(tmp_path, epochs=1, **TINY_MLP).fit()
    arrays, meta = checkpoint.load(tmp_path / "checkpoint.npz")
    for k in ("pred", "label_dropout", "warmup", "lr_schedule"):
        del meta["train_config"][k]
    del meta["prediction"]
    _write_raw(tmp_path / "checkpoint.npz", arrays, json.loads(json.dumps(meta)))
    t = trainer(tmp_path, resume=True, epochs=2, **TINY_MLP)
    assert t.epoch == 1


@pytest.mark.parametrize("kw,match", [
    (dict(pred="score"), "pred"), (dict(label_dropout=1.0), "label_dropout"),
    (dict(label_dropout=-0.5), "label_dropout"),
    (dict(warmup=-1), "warmup"), (dict(warmup=2.5), "warmup"), (dict(lr_schedule="step"), "lr_schedule"),
])
def test_bad_config_values(kw, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kw).validate()


@pytest.mark.parametrize("kw,match", [
    (dict(TINY_MLP, label_dropout=0.1), "label_dropout.*class-conditional"),
    (dict(TINY_MLP, pred="v", loss="dsm"), "pred 'v' and class conditioning need loss 'ddpm'"),
    (dict(data="mnist5k", model="vae", model_args={"hidden": [8], "latent": 2}, limit=8, pred="x0"), "pred"),
])
def test_knobs_the_model_cannot_take(tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        trainer(tmp_path, epochs=1, **kw)


def test_the_command_line_maps_the_knobs(tmp_path):
    from refdiff.cli import main
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), "--model", "mlp", "--model-arg", "widths=[8]", "--limit", "16",
                 "--batch", "8", "--epochs", "2", "--pred", "x0", "--warmup", "1", "--lr-schedule", "cosine",
                 "--schedule", "cosine"]) == 0
    arrays, meta = checkpoint.load(out / "checkpoint.npz")
    c = meta["train_config"]
    assert (c["pred"], c["warmup"], c["lr_schedule"], c["schedule"], c["label_dropout"]) == ("x0", 1, "cosine",
                                                                                              "cosine", 0.0)
    assert meta["prediction"] == "x0" and meta["ddpm_schedule"]["kind"] == "cosine"
    assert int(arrays["optim/model/step"]) == 4
