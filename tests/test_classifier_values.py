"""The MNIST classifier CNN (refdiff.nn.classifier.Classifier) by value: logits and features
against the same network written here with loops-free plain NumPy (zero padding, a 3 x 3
cross-correlation as a sum of nine shifted products, a 2 x 2 max pool by reshape), in
float64 on a few channels; `strided_view` against NumPy's sliding_window_view.
"""
from __future__ import annotations

import numpy as np
import pytest

from refdiff.nn.array_module import strided_view
from refdiff.nn.classifier import Classifier
from tests.helpers import TOL, assert_close

T64 = TOL[np.dtype(np.float64)]


def _conv3x3(x, w, b):
    """x (B, Cin, H, W), w (Cout, Cin, 3, 3): cross-correlation with padding 1, written as
    the sum over the nine kernel taps of a shifted copy of x."""
    B, _, H, W = x.shape
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    out = np.zeros((B, w.shape[0], H, W)) + b[None, :, None, None]
    for i in range(3):
        for j in range(3):
            out += np.einsum("bchw,oc->bohw", xp[:, :, i:i + H, j:j + W], w[:, :, i, j])
    return out


def _pool2(x):
    B, C, H, W = x.shape
    return x.reshape(B, C, H // 2, 2, W // 2, 2).max(axis=(3, 5))


def test_classifier_logits_and_features_against_plain_numpy():
    # bug caught: a flipped kernel (convolution for cross-correlation), the pool taking the
    # mean or a wrong window, the flatten order differing from fc1's, features taken before the ReLU
    m = Classifier(channels=(2, 3), hidden=5, classes=10, dtype=np.float64, seed=0)
    p = m.params
    x = np.random.default_rng(0).uniform(-1, 1, (3, 1, 28, 28))
    h = _pool2(np.maximum(_conv3x3(x, p["conv1.weight"], p["conv1.bias"]), 0))
    h = _pool2(np.maximum(_conv3x3(h, p["conv2.weight"], p["conv2.bias"]), 0))
    feats = np.maximum(h.reshape(3, -1) @ p["fc1.weight"].T + p["fc1.bias"], 0)
    logits = feats @ p["fc2.weight"].T + p["fc2.bias"]
    lg, ft = m.logits_and_features(x)
    assert_close(ft, feats, name="features", **T64)
    assert_close(lg, logits, name="logits", **T64)
    assert_close(m.forward(x), logits, name="forward", **T64)
    assert_close(m.predict(x, batch=2), logits, name="predict in batches", **T64)
    assert m.num_parameters() == 2 * 9 + 2 + 3 * 2 * 9 + 3 + 3 * 49 * 5 + 5 + 5 * 10 + 10


def test_classifier_default_size_is_the_reports():
    assert Classifier().num_parameters() == 421642           # refdiff/nn/classifier.py docstring


@pytest.mark.parametrize("shape, window", [((7,), (3,)), ((4, 5), (2, 3)), ((3, 4, 4), (1, 2, 2))])
def test_strided_view_is_a_read_only_sliding_window(shape, window):
    x = np.arange(np.prod(shape), dtype=np.float64).reshape(shape)
    out_shape = tuple(s - w + 1 for s, w in zip(shape, window)) + window
    v = strided_view(np, x, out_shape, x.strides + x.strides)
    assert np.array_equal(v, np.lib.stride_tricks.sliding_window_view(x, window))
    assert np.shares_memory(v, x)                             # a view, not a copy
    with pytest.raises(ValueError):
        v[(0,) * v.ndim] = 1.0                                # read-only: a write would alias many cells
