"""`refdiff ring` end to end on tiny settings (the real numbers come from the default run)."""
import json

import numpy as np
import pytest

from refdiff import checkpoint
from refdiff.cli import main


def test_ring_command_writes_metrics_plot_checkpoint(tmp_path):
    out = tmp_path / "ring"
    rc = main(["ring", "--out", str(out), "--train-steps", "30", "--n", "300", "--steps", "20",
               "--batch", "64", "--seed", "3"])
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())
    for key in ("frechet_distance", "sliced_wasserstein", "frechet_distance_real_vs_real",
                "sliced_wasserstein_real_vs_real", "energy_distance", "n", "train_seconds",
                "sample_seconds", "config", "seed"):
        assert key in m, key
    assert m["n"] == 300 and m["seed"] == 3 and m["config"]["train_steps"] == 30
    assert m["frechet_distance_real_vs_real"] > 0
    assert (out / "ring.png").stat().st_size > 10000
    assert np.load(out / "samples.npy").shape == (300, 2)
    model, sections, meta = checkpoint.load_model(out / "checkpoint.npz")
    assert meta["config"]["seed"] == 3 and sections["ema"]


@pytest.mark.parametrize("argv, match", [
    (["--steps", "0"], "expected a positive integer"),
    (["--lr", "-1"], "expected a finite positive number"),
    (["--sde", "cosine"], "invalid choice"),
])
def test_ring_rejects_bad_flags(tmp_path, capsys, argv, match):
    with pytest.raises(SystemExit) as e:
        main(["ring", "--out", str(tmp_path)] + argv)
    assert e.value.code == 2
    assert match in capsys.readouterr().err


def test_ring_rejects_unknown_loss(tmp_path, capsys):
    assert main(["ring", "--out", str(tmp_path), "--loss", "nce"]) == 2
    assert "loss must be one of" in capsys.readouterr().err
