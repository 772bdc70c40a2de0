"""benchmarks/fused_layer.py runs end to end on a small layer, both routes of version 3
(the per-sample frame with its parts, and the dense product of an image no larger than the
kernel), and refuses bad arguments."""
import os
import sys

import pytest

pytest.importorskip("numba")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import fused_layer  # noqa: E402


def test_fused_layer_prints_both_versions_and_the_parts(capsys):
    assert fused_layer.main(["--cin", "4", "--cout", "6", "--size", "6", "--batch", "3", "--groups", "2",
                             "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    for want in ("version 2 conv2d_silu", "version 3 group_norm_conv2d", "micro-kernel", "GroupNorm statistics",
                 "valid columns out"):
        assert want in out, out
    assert fused_layer.main(["--cin", "8", "--cout", "8", "--size", "3", "--batch", "2", "--groups", "2",
                             "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "dense product" in out and "micro-kernel" not in out


@pytest.mark.parametrize("argv", [["--batch", "0"], ["--cin", "10", "--groups", "3"]])
def test_fused_layer_refuses_bad_arguments(argv, capsys):
    with pytest.raises(SystemExit) as e:
        fused_layer.main(argv)
    assert e.value.code == 2
