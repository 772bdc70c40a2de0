"""Safeguards of class-conditional sampling and unet-ddpm's configuration: an untrained null
label is refused wherever it would be used, heads must divide the middle attention block,
labels must be integers, and a loss that cannot apply dropout refuses a model that has it."""
import numpy as np
import pytest

from refdiff import prediction as P
from refdiff.nn import make_model
from refdiff.objectives import EpsObjective

TINY = dict(channels=[4], blocks=1, attention=[], image_size=4, max_groups=2, zero_init=False)


def _net(**kw):
    return make_model("unet-ddpm", dtype=np.float64, **dict(TINY, num_classes=2, **kw))


def _meta(label_dropout):
    return {"prediction": "v", "train_config": {"label_dropout": label_dropout}}


def test_an_untrained_null_label_is_refused_where_it_would_be_used():
    net = _net()
    x, t = np.random.default_rng(0).standard_normal((2, 1, 4, 4)), np.array([0.3, 0.6])
    assert P.null_label_trained(net, _meta(0.1)) and not P.null_label_trained(net, _meta(0.0))
    assert P.null_label_trained(net, {"prediction": "v"})          # no record: not refused
    bare = P.as_eps(net, _meta(0.0))                                # unconditional use: refused at the call
    with pytest.raises(ValueError, match="--label-dropout 0"):
        bare.forward(x, t)
    with pytest.raises(ValueError, match="--label-dropout 0"):
        P.as_eps(net, _meta(0.0), labels=np.array([0, 1]), guidance=2.0).forward(x, t)
    # the conditional model itself (guidance 1) needs no null label: it runs, and equals the
    # same sampling of a run that did train the null label
    a = P.as_eps(net, _meta(0.0), labels=np.array([0, 1])).forward(x, t)
    b = P.as_eps(net, _meta(0.1), labels=np.array([0, 1])).forward(x, t)
    np.testing.assert_array_equal(a, b)
    # an eps-network is wrapped too when its null label is untrained (it is otherwise returned as is)
    eps_meta = {"train_config": {"label_dropout": 0.0}}
    assert isinstance(P.as_eps(net, eps_meta), P.EpsModel)
    assert P.as_eps(net, {"train_config": {"label_dropout": 0.1}}) is net
    # an unconditional network has no null label to train
    unc = make_model("unet-ddpm", dtype=np.float64, **TINY)
    assert P.as_eps(unc, {"train_config": {"label_dropout": 0.0}}) is unc


def test_heads_must_divide_the_middle_attention_block():
    with pytest.raises(ValueError, match="middle attention block"):
        make_model("unet-ddpm", channels=[6, 8], image_size=4, attention=[0], heads=3)
    with pytest.raises(ValueError, match="middle attention block"):
        make_model("unet-ddpm", attention=[], heads=3)                 # 64 channels at the bottom


@pytest.mark.parametrize("labels", [np.array([True, False]), np.array([1.0, 0.0])], ids=["bool", "float"])
def test_labels_must_be_integers(labels):
    net = _net()
    with pytest.raises(ValueError, match="labels y must be integers"):
        net.forward(np.zeros((2, 1, 4, 4)), np.array([0.3, 0.6]), labels)


def test_a_loss_without_dropout_refuses_a_model_with_dropout():
    with pytest.raises(ValueError, match="dropout 0.1 would be silently off"):
        EpsObjective(make_model("unet-ddpm", dtype=np.float64, **dict(TINY, dropout=0.1)), {"loss": "dsm"})
    EpsObjective(make_model("unet-ddpm", dtype=np.float64, **dict(TINY, dropout=0.0)), {"loss": "dsm"})
    EpsObjective(make_model("unet-ddpm", dtype=np.float64, **dict(TINY, dropout=0.1)), {"loss": "ddpm"})
