"""A file given as a checkpoint either loads to exactly what was saved or raises
CheckpointError, whatever was done to it: a byte changed anywhere (zip local and central
headers, the .npy headers, the JSON metadata, the array data), a truncation at any length,
or a structure of the wrong shape. Weights that are not floating point, or not finite, are
refused on load and on save.

The property: for a small real checkpoint (a 2-layer MLP with EMA and Adam state, ~10 kB),
flip_byte(i, v) or truncate(n) then load_model gives either CheckpointError or arrays and
metadata equal to the original (a change in a byte nothing reads, such as a zip timestamp,
is allowed to load).
"""
import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from refdiff import checkpoint
from refdiff.nn import make_model
from tests.helpers import examples, trained_mlp_checkpoint


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    path = tmp_path_factory.mktemp("ck") / "ck.npz"
    trained_mlp_checkpoint(path, 2, 3, dict(widths=[4], emb_dim=4, temb_dim=4), epoch=2)
    arrays, meta = checkpoint.load(path)
    return path.read_bytes(), arrays, meta


def _loads_to_original_or_refuses(path, arrays, meta):
    try:
        model, _, got_meta = checkpoint.load_model(path)
        got, _ = checkpoint.load(path)
    except checkpoint.CheckpointError:
        return
    assert got_meta == meta and sorted(got) == sorted(arrays)
    for k in arrays:
        assert got[k].dtype == arrays[k].dtype and np.array_equal(got[k], arrays[k]), k


SETTINGS = settings(max_examples=examples(250), deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


@SETTINGS
@given(st.data())
def test_any_flipped_byte_is_refused_or_harmless(original, tmp_path, data):
    blob, arrays, meta = original
    i = data.draw(st.integers(0, len(blob) - 1), label="offset")
    v = data.draw(st.integers(0, 255).filter(lambda v: v != blob[i]), label="new byte")
    path = tmp_path / "flipped.npz"
    path.write_bytes(blob[:i] + bytes([v]) + blob[i + 1:])
    _loads_to_original_or_refuses(path, arrays, meta)


def _header_offsets(blob):
    """Every byte of every zip local/central header and .npy header (where corruption gave
    NotImplementedError, RuntimeError, tokenize.TokenError before)."""
    out = []
    for sig, size in ((b"PK\x03\x04", 30), (b"PK\x01\x02", 46), (b"\x93NUMPY", 64)):
        i = blob.find(sig)
        while i >= 0:
            out.extend(range(i, min(i + size, len(blob))))
            i = blob.find(sig, i + 1)
    return out


@SETTINGS
@given(st.data())
def test_flipped_header_byte_is_refused_or_harmless(original, tmp_path, data):
    blob, arrays, meta = original
    i = data.draw(st.sampled_from(_header_offsets(blob)), label="header offset")
    v = data.draw(st.integers(0, 255).filter(lambda v: v != blob[i]), label="new byte")
    path = tmp_path / "flipped.npz"
    path.write_bytes(blob[:i] + bytes([v]) + blob[i + 1:])
    _loads_to_original_or_refuses(path, arrays, meta)


@settings(max_examples=examples(100), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_any_truncation_is_refused(original, tmp_path, data):
    blob, _, _ = original
    n = data.draw(st.integers(0, len(blob) - 1), label="length")
    path = tmp_path / "cut.npz"
    path.write_bytes(blob[:n])
    with pytest.raises(checkpoint.CheckpointError):
        checkpoint.load_model(path)


def test_the_property_can_fail(original, tmp_path):
    """A flipped byte inside the array data must not load (the zip CRC or the SHA-256 sees it);
    the header offsets cover the zip headers found in the file."""
    blob, arrays, meta = original
    assert len(_header_offsets(blob)) > 30 * len(arrays)
    needle = arrays["params/out.bias"].tobytes()
    i = blob.index(needle)
    path = tmp_path / "f.npz"
    path.write_bytes(blob[:i] + bytes([blob[i] ^ 1]) + blob[i + 1:])
    with pytest.raises(checkpoint.CheckpointError):
        checkpoint.load_model(path)


def _rewrite(path, arrays, meta):
    meta = dict(meta, sha256={k: checkpoint._digest(v) for k, v in arrays.items()})
    with open(path, "wb") as f:
        np.savez(f, __meta__=np.frombuffer(json.dumps(meta).encode(), np.uint8), **arrays)


@pytest.mark.parametrize("change,match", [
    (lambda a, m: (dict(a, **{"params/out.weight": np.round(a["params/out.weight"]).astype(np.int32)}), m),
     "dtype int32; weights are floating point"),
    (lambda a, m: (dict(a, **{"ema/out.bias": a["ema/out.bias"] * np.inf}), m), "NaN or Inf"),
    (lambda a, m: (dict(a, **{"optim/v/out.bias": a["optim/v/out.bias"] + np.nan}), m), "NaN or Inf"),
    (lambda a, m: (a, [m]), "not an object"),
    (lambda a, m: (a, dict(m, model={"name": "mlp"})), "model spec"),
    (lambda a, m: (a, dict(m, model=dict(m["model"], dtype="int8"))), "model spec"),
    (lambda a, m: (a, dict(m, model=dict(m["model"], name="nope"))), "cannot be built"),
    (lambda a, m: (a, dict(m, model=dict(m["model"], config=dict(m["model"]["config"], bogus=1)))),
     "cannot be built"),
])
def test_malformed_structure_is_refused(original, tmp_path, change, match):
    _, arrays, meta = original
    a, m = change(dict(arrays), {k: v for k, v in meta.items() if k != "sha256"})
    path = tmp_path / "m.npz"
    if isinstance(m, list):
        with open(path, "wb") as f:
            np.savez(f, __meta__=np.frombuffer(json.dumps(m).encode(), np.uint8), **a)
    else:
        _rewrite(path, a, m)
    with pytest.raises(checkpoint.CheckpointError, match=match):
        checkpoint.load_model(path)


def test_manifest_of_the_wrong_shape(original, tmp_path):
    _, arrays, meta = original
    path = tmp_path / "m.npz"
    with open(path, "wb") as f:
        np.savez(f, __meta__=np.frombuffer(json.dumps(dict(meta, sha256=[1])).encode(), np.uint8), **arrays)
    with pytest.raises(checkpoint.CheckpointError, match="manifest"):
        checkpoint.load(path)


def test_npy_and_directory_are_refused(tmp_path):
    np.save(tmp_path / "a.npy", np.zeros(3))
    with pytest.raises(checkpoint.CheckpointError, match="single .npy array"):
        checkpoint.load(tmp_path / "a.npy")
    with pytest.raises(checkpoint.CheckpointError, match="is a directory"):
        checkpoint.load(tmp_path)


@pytest.mark.parametrize("bad,match", [("nan", "NaN or Inf"), ("int", "floating point")])
def test_bad_weights_are_not_saved(tmp_path, bad, match):
    m = make_model("mlp", dim=2, widths=[4], seed=0)
    state = m.state()
    if bad == "nan":
        m.params["out.bias"][0] = np.nan
        with pytest.raises(ValueError, match=match):
            checkpoint.save_model(tmp_path / "ck.npz", m)
    else:
        with pytest.raises(ValueError, match=match):
            checkpoint.save(tmp_path / "ck.npz", {"params/out.bias": state["out.bias"].astype(np.int64)}, {})
    assert not list(tmp_path.iterdir())           # nothing written, no temporary left


@pytest.mark.parametrize("bad,match", [("nan", "NaN or Inf"), ("int", "dtype int32")])
def test_model_load_state_refuses_bad_values(bad, match):
    m = make_model("mlp", dim=2, widths=[4], seed=0)
    state = m.state()
    before = {k: v.copy() for k, v in m.params.items()}
    state["out.bias"] = state["out.bias"] * np.nan if bad == "nan" else np.ones(state["out.bias"].shape, np.int32)
    with pytest.raises(ValueError, match=match):
        m.load_state(state)
    assert all(np.array_equal(before[k], m.params[k]) for k in before)      # nothing half-loaded
