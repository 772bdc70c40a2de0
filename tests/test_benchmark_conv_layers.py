"""benchmarks/conv_layers.py: every model's layer list is well formed (output sizes, paddings,
the FLOP count), a run of unet-ddpm's layers at batch 1 writes a time for each of them (the
fastest of its rounds), and bad arguments are one clear error."""
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import conv_layers  # noqa: E402


@pytest.mark.parametrize("model", sorted(conv_layers.SHAPES))
def test_layer_lists_are_convolutions_of_their_models_sizes(model):
    """Each layer's inputs are shaped as its entry says, dy as the conv's output."""
    shapes = conv_layers.SHAPES[model]
    assert len(set(shapes)) == len(shapes)
    for i, (ci, co, H, k, s) in enumerate(shapes):
        x, w, b, dy = conv_layers._inputs(shapes, i, 2)
        ho = (H + 2 * conv_layers._padding(k) - k) // s + 1
        assert x.shape == (2, ci, H, H) and w.shape == (co, ci, k, k) and b.shape == (co,)
        assert dy.shape == (2, co, ho, ho) and ho >= 1


def test_unet_ddpm_run_times_every_layer(tmp_path):
    pytest.importorskip("numba")
    out = tmp_path / "layers.json"
    assert conv_layers.main(["--model", "unet-ddpm", "--batch", "1", "--versions", "6", "--no-torch",
                             "--rounds", "2", "--out", str(out)]) == 0
    rec = json.loads(out.read_text())
    assert rec["model"] == "unet-ddpm" and len(rec["layers"]) == len(conv_layers.SHAPES["unet-ddpm"])
    assert rec["rounds"] == 2
    for row, (ci, co, H, k, s) in zip(rec["layers"], conv_layers.SHAPES["unet-ddpm"]):
        ho = (H + 2 * conv_layers._padding(k) - k) // s + 1
        assert row["forward_gflop"] == pytest.approx(2 * ci * co * k * k * ho * ho / 1e9)
        t = row["numba_v6_ms"]
        assert 0 < t["forward"] < 1e4 and 0 < t["backward"] < 1e4
        assert len(t["rounds"]) == 2                  # the figure is the fastest round's
        assert t["forward"] == min(r["forward"] for r in t["rounds"])
        assert t["backward"] == min(r["backward"] for r in t["rounds"])


@pytest.mark.parametrize("argv", [["--batch", "0"], ["--rounds", "0"], ["--threads", "0"], ["--versions", "6,x"],
                                  ["--model", "unet"], ["--versions", "99", "--no-torch", "--batch", "1"]])
def test_bad_arguments_are_one_clear_error(argv, capsys):
    with pytest.raises(SystemExit) as e:
        conv_layers.main(argv)
    assert e.value.code == 2
    assert "error:" in capsys.readouterr().err
