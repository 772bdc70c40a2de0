"""refdiff.checkpoint: atomic writes, round trips, and refusal of bad files."""
import json
import os

import numpy as np
import pytest

from refdiff import checkpoint
from refdiff.optim import Adam
from tests.helpers import trained_mlp_checkpoint


def _trained(tmp_path):
    path = tmp_path / "ck.npz"
    m, opt, ema = trained_mlp_checkpoint(path, 3, 4, dict(widths=[8]), epoch=3, note="x")
    return m, opt, ema, path


def test_round_trip_params_ema_optimizer(tmp_path):
    m, opt, ema, path = _trained(tmp_path)
    m2, sections, meta = checkpoint.load_model(path)
    assert meta["epoch"] == 3 and meta["note"] == "x" and meta["model"]["name"] == "mlp"
    for k in m.params:
        assert np.array_equal(m.params[k], m2.params[k])
        assert np.array_equal(ema.shadow[k], sections["ema"][k])
    opt2 = Adam(m2, lr=1e-2)
    opt2.load_state(sections["optim"])
    assert opt2.step_count == 3 and all(np.array_equal(opt.m[k], opt2.m[k]) for k in opt.m)
    m3, _, _ = checkpoint.load_model(path, use_ema=True)
    assert all(np.array_equal(m3.params[k], ema.shadow[k]) for k in m.params)


def test_write_is_atomic(tmp_path, monkeypatch):
    """A crash while writing leaves the previous checkpoint intact and loadable."""
    m, opt, ema, path = _trained(tmp_path)
    before = path.read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(np, "savez", boom)
    with pytest.raises(OSError):
        checkpoint.save_model(path, m)
    assert path.read_bytes() == before
    checkpoint.load_model(path)


def test_truncated_file_is_refused(tmp_path):
    _, _, _, path = _trained(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(checkpoint.CheckpointError, match="corrupt or truncated"):
        checkpoint.load_model(path)


def test_flipped_byte_is_refused(tmp_path):
    """A flipped byte inside an array's data is caught (zip CRC or our SHA-256)."""
    m, _, _, path = _trained(tmp_path)
    data = bytearray(path.read_bytes())
    needle = m.params["layers.0.weight"].tobytes()[:16]
    i = bytes(data).index(needle)
    data[i] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(checkpoint.CheckpointError, match="corrupt|tampered"):
        checkpoint.load_model(path)


def test_array_replaced_without_manifest_is_refused(tmp_path):
    """Arrays rewritten by another tool keep the old manifest: the SHA-256 check fails."""
    _, _, _, path = _trained(tmp_path)
    arrays, meta = checkpoint.load(path)
    arrays["params/out.bias"] = arrays["params/out.bias"] + 1
    blob = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    with open(path, "wb") as f:
        np.savez(f, __meta__=blob, **arrays)
    with pytest.raises(checkpoint.CheckpointError, match="fails its checksum"):
        checkpoint.load(path)


def test_missing_file_and_not_a_checkpoint(tmp_path):
    with pytest.raises(checkpoint.CheckpointError, match="does not exist"):
        checkpoint.load(tmp_path / "nope.npz")
    np.savez(tmp_path / "plain.npz", a=np.zeros(3))
    with pytest.raises(checkpoint.CheckpointError, match="not a refdiff checkpoint"):
        checkpoint.load(tmp_path / "plain.npz")


def test_other_architecture_is_refused(tmp_path):
    _, _, _, path = _trained(tmp_path)
    with pytest.raises(checkpoint.CheckpointError, match="holds a 'mlp' model"):
        checkpoint.load_model(path, expect="unet-seed")
    with pytest.raises(checkpoint.CheckpointError, match="expected config="):
        checkpoint.load_model(path, expect={"name": "mlp", "config": {"dim": 3}})


def test_no_temporary_file_left_behind(tmp_path):
    _, _, _, path = _trained(tmp_path)
    assert os.listdir(tmp_path) == ["ck.npz"]
