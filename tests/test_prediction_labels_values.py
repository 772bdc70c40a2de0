"""refdiff.prediction's small checks by value: the prediction target a checkpoint records
(`prediction_of`, `check_prediction`) and the class labels a class-conditional network
accepts (`check_labels`): what each returns, and the refusals with the flag they name.
"""
from __future__ import annotations

import types

import numpy as np
import pytest

from refdiff import prediction as P


def test_prediction_of_and_check_prediction():
    # bug caught: a checkpoint written before the field existed read as anything but eps
    assert P.prediction_of({}) == "eps" and P.prediction_of(None) == "eps"
    for pred in P.PREDICTIONS:
        assert P.prediction_of({"prediction": pred}) == pred and P.check_prediction(pred) == pred
    with pytest.raises(ValueError, match=r"^--pred \(the prediction target\) must be one of .*; got 'score'$"):
        P.check_prediction("score", "--pred")
    with pytest.raises(ValueError, match="the checkpoint's prediction target"):
        P.prediction_of({"prediction": 3})


def test_check_labels_against_the_networks_classes():
    # bug caught: an off-by-one upper bound (label K accepted), labels left int8/int32
    net = types.SimpleNamespace(name="unet-cond", config={"num_classes": 3})
    y = P.check_labels(net, np.array([2, 0, 1], dtype=np.int32))
    assert y.dtype == np.int64 and y.tolist() == [2, 0, 1]
    with pytest.raises(ValueError, match=r"^--class 3 is outside the trained classes \[0, 2\] \(num_classes 3\)$"):
        P.check_labels(net, [0, 3])
    with pytest.raises(ValueError, match=r"^labels -1 is outside"):
        P.check_labels(net, [-1, 1], what="labels")
    with pytest.raises(ValueError, match="1-D array of integer labels"):
        P.check_labels(net, np.array([0.0, 1.0]))
    with pytest.raises(ValueError, match="needs a class-conditional model; 'mlp' is unconditional"):
        P.check_labels(types.SimpleNamespace(name="mlp", config={}), [0])
