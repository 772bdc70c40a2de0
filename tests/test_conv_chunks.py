"""conv2d and conv_transpose2d computed in batch chunks (refdiff.nn.conv.CHUNK_BYTES)
give what the same ops give in one chunk, and what the naive loops give; the chunks cover the
batch once, in order.

Chunking changes no sum (dw is one product over the whole batch), so float64 results agree
to TOL[float64] (rounding of sums of ~100 terms in another order at most).
test_conv_ops.py's hypothesis cases have B <= 3 and tiny images, which always fit in one
chunk: this file forces several, with an uneven last one.
"""
import numpy as np
import pytest

from refdiff.nn import conv
from refdiff.nn import functional as F
from tests.helpers import TOL, assert_close

T64 = TOL[np.dtype(np.float64)]

# (op, kernel, stride, padding, input size): conv2d's two input-gradient branches (stride 1
# square kernel as a convolution of dy, col2im otherwise) and the transposed conv's col2im.
CASES = [("conv2d", 3, 1, 1, 7), ("conv2d", 4, 2, 1, 8), ("conv2d", 3, 2, 0, 7), ("conv2d", 2, 1, 0, 5),
         ("conv_transpose2d", 4, 2, 1, 4), ("conv_transpose2d", 2, 1, 0, 5), ("conv_transpose2d", 3, 2, 1, 3)]


def _run(op, k, stride, padding, size, dtype=np.float64, B=5):
    rng = np.random.default_rng(k * 10 + stride)
    Cin, Cout = 3, 2
    x = rng.standard_normal((B, Cin, size, size)).astype(dtype)
    w = rng.standard_normal(((Cin, Cout) if op == "conv_transpose2d" else (Cout, Cin)) + (k, k)).astype(dtype)
    b = rng.standard_normal(Cout).astype(dtype)
    y, cache = getattr(F, op + "_forward")(x, w, b, stride, padding)
    dy = rng.standard_normal(y.shape).astype(dtype)
    return (x, w, b), y, getattr(F, op + "_backward")(dy, cache)


def _spy(monkeypatch):
    """Record (bytes per image, chunk sizes) of every _batch_chunks call that may split
    (those asking for the whole batch, for dw's one product, take one chunk by design)."""
    seen, real = [], conv._batch_chunks

    def spy(xp, B, bytes_per_image, whole=False):
        chunks = real(xp, B, bytes_per_image, whole)
        if not whole:
            seen.append((bytes_per_image, [s.stop - s.start for s in chunks]))
        return chunks
    monkeypatch.setattr(conv, "_batch_chunks", spy)
    return seen


@pytest.mark.parametrize("op,k,stride,padding,size", CASES)
@pytest.mark.parametrize("images", [1, 2.5])      # per chunk: one; 2 or 3 (B = 5: an uneven last chunk)
def test_chunks_agree_with_one_chunk(op, k, stride, padding, size, images, monkeypatch):
    monkeypatch.setattr(conv, "CHUNK_BYTES", 1 << 40)
    seen = _spy(monkeypatch)
    (x, w, b), y1, grads1 = _run(op, k, stride, padding, size)
    assert seen and all(sizes == [5] for _, sizes in seen)
    # the call sites' images differ in size (Cin vs Cout rows) by less than 1.6x: 2.5 of the
    # largest gives every site 2 or 3 images per chunk
    monkeypatch.setattr(conv, "CHUNK_BYTES", int(images * max(b for b, _ in seen)))
    seen.clear()
    _, y, grads = _run(op, k, stride, padding, size)
    assert seen and all(len(sizes) > 1 for _, sizes in seen), f"not split into chunks: {seen}"
    if images > 1:
        assert all(len(set(sizes)) > 1 and max(sizes) > 1 for _, sizes in seen), f"no uneven last chunk: {seen}"
    assert_close(y, y1, name=f"{op} forward, chunked", **T64)
    for name, g, g1 in zip(("dx", "dw", "db"), grads, grads1):
        assert_close(g, g1, name=f"{op} {name}, chunked", **T64)
    naive, _ = getattr(F, op + "_naive_forward")(x, w, b, stride, padding)
    assert_close(y, naive, name=f"{op} forward, chunked, vs the naive loop", **T64)


def test_chunks_keep_float32(monkeypatch):
    monkeypatch.setattr(conv, "CHUNK_BYTES", 1)
    for op, k, stride, padding, size in CASES:
        _, y, grads = _run(op, k, stride, padding, size, np.float32)
        assert y.dtype == np.float32 and all(g.dtype == np.float32 for g in grads), op


@pytest.mark.parametrize("B,bytes_per_image,chunk_bytes,sizes", [
    (5, 300, 700, [2, 2, 1]), (4, 100, 1000, [4]), (3, 10**6, 700, [1, 1, 1]), (1, 1, 1, [1])])
def test_batch_chunks_cover_the_batch(B, bytes_per_image, chunk_bytes, sizes, monkeypatch):
    monkeypatch.setattr(conv, "CHUNK_BYTES", chunk_bytes)
    chunks = conv._batch_chunks(np, B, bytes_per_image)
    assert [s.stop - s.start for s in chunks] == sizes
    assert np.concatenate([np.arange(B)[s] for s in chunks]).tolist() == list(range(B))
