"""Stable log-softmax cross-entropy (FD and value checks), the MNIST classifier end to end
against finite differences, its architecture, the shift augmentation, bad input."""
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from refdiff.nn import functional as F
from refdiff.nn import make_model, model_from_spec
from refdiff.nn.classifier import random_shift
from refdiff.objectives import ClassifierObjective
from tests.helpers import assert_fd, check_grads, examples, fd_grad


def _ce(labels):
    def fwd(z):
        loss, cache = F.log_softmax_cross_entropy_forward(z, labels)
        return np.asarray(loss), cache                 # check_grads wants an array output
    return fwd


@settings(max_examples=examples(30), deadline=None)
@given(b=st.integers(1, 6), k=st.integers(1, 7), scale=st.sampled_from([0.1, 3.0, 30.0]),
       seed=st.integers(0, 2**31))
@example(b=5, k=5, scale=30.0, seed=57915)      # |L dy| ~ 160: FD rounding ~ 2e-8, past a fixed atol of 1e-8
def test_cross_entropy_grad(b, k, scale, seed):
    rng = np.random.default_rng(seed)
    z, y = scale * rng.standard_normal((b, k)), rng.integers(0, k, b)
    # log-sum-exp subtracts the largest logit: its rounding is that of max |z|, not of the loss
    check_grads(_ce(y), F.log_softmax_cross_entropy_backward, [z], rng, scale=float(np.abs(z).max()))


def test_cross_entropy_value_and_extremes():
    """Equals mean(log sum exp z - z_y) where exp does not overflow; exact and finite for
    logits of 1e4 (where the naive softmax gives inf/inf = NaN)."""
    rng = np.random.default_rng(0)
    z, y = 2 * rng.standard_normal((8, 10)), rng.integers(0, 10, 8)
    naive = np.mean(np.log(np.exp(z).sum(1)) - z[np.arange(8), y])
    assert F.log_softmax_cross_entropy_forward(z, y)[0] == pytest.approx(naive, rel=1e-12)
    z = np.array([[1e4, 0.0, -1e4], [0.0, 1e4, 0.0]], dtype=np.float32)
    loss, cache = F.log_softmax_cross_entropy_forward(z, np.array([0, 0]))
    assert loss == pytest.approx(1e4 / 2, rel=1e-6)          # row 1 is right (0), row 2 off by 1e4
    g = F.log_softmax_cross_entropy_backward(1.0, cache)
    assert g.dtype == np.float32 and np.allclose(g, [[0, 0, 0], [-0.5, 0.5, 0]])


def test_parameter_count_and_shapes():
    """The report's code (layers in docs/report.md): 421,642 = 320 + 18,496 + 401,536 + 1,290."""
    m = make_model("classifier")
    assert m.num_parameters() == 421_642
    x = np.random.default_rng(0).uniform(-1, 1, (3, 1, 28, 28)).astype(np.float32)
    logits, feats = m.logits_and_features(x)
    assert logits.shape == (3, 10) and feats.shape == (3, 128) and logits.dtype == np.float32
    assert np.array_equal(m.forward(x), logits) and np.array_equal(m.features(x), feats)
    assert np.allclose(feats @ m.params["fc2.weight"].T + m.params["fc2.bias"], logits, atol=1e-5)
    m2 = model_from_spec(m.spec())
    m2.load_state(m.state())
    assert np.array_equal(m2.forward(x), logits)


def test_classifier_grad_end_to_end():
    """d cross-entropy / d (sampled parameter entries, a few pixels) vs central FD, float64."""
    rng = np.random.default_rng(0)
    m = make_model("classifier", dtype=np.float64, seed=1)
    obj = ClassifierObjective(m)
    x, y = rng.uniform(-1, 1, (2, 1, 28, 28)), np.array([3, 7])
    obj.loss_and_grad(x, y)
    grads = {k: g.copy() for k, g in m.grads.items()}
    loss = lambda: obj.loss_and_grad(x, y)[0]
    for k, p in m.params.items():
        flat = p.reshape(-1)                             # a view: FD perturbs the parameter
        for j in rng.choice(flat.size, size=min(4, flat.size), replace=False):
            assert_fd(grads[k].reshape(-1)[j:j + 1], fd_grad(loss, flat[j:j + 1]), name=f"d loss / d {k}[{j}]")
    m.zero_grad()
    logits = m.forward(x)
    dx = m.backward(F.log_softmax_cross_entropy_backward(1.0, F.log_softmax_cross_entropy_forward(logits, y)[1]))
    sub = (1, 0, slice(12, 14), slice(12, 15))
    assert_fd(dx[sub], fd_grad(loss, x[sub]), name="d loss / d x")


def test_random_shift():
    """Shift 0 is the identity; otherwise each image is its own translate by |d| <= s, padded
    with -1 (so a digit away from the border keeps its pixel sum), and shifts vary."""
    rng = np.random.default_rng(0)
    x = -np.ones((64, 1, 28, 28), np.float32)
    x[:, :, 10:18, 9:20] = rng.uniform(-1, 1, (64, 1, 8, 11))
    assert random_shift(x, rng, 0) is x
    y = random_shift(x, rng, 2)
    assert y.shape == x.shape and np.allclose(y.sum(axis=(1, 2, 3)), x.sum(axis=(1, 2, 3)), atol=1e-3)
    found = set()
    for i in range(64):
        for dy in range(-2, 3):
            for dx in range(-2, 3):
                if np.array_equal(np.roll(x[i], (dy, dx), axis=(1, 2)), y[i]):
                    found.add((dy, dx))
                    break
    assert len(found) > 10      # 25 possible shifts, 64 images: almost all of them appear


def test_objective_learns_two_classes():
    """Two fixed random patterns labelled 0 and 1: 20 Adam steps reach 100 % batch accuracy
    and a loss below 0.1 (from ln 10 = 2.3)."""
    rng = np.random.default_rng(0)
    pat = rng.uniform(-1, 1, (2, 1, 28, 28)).astype(np.float32)
    x, y = pat[np.arange(16) % 2], np.arange(16) % 2
    obj = ClassifierObjective(make_model("classifier", seed=0), dict(shift=0))
    out = [obj.step(x, y, rng) for _ in range(20)]
    assert out[0]["loss"] > 1.5 and out[-1]["loss"] < 0.1 and out[-1]["acc"] == 1.0, out[-1]
    assert obj.ema.num_updates == 20 and not np.array_equal(obj.ema.shadow["fc2.weight"], obj.model.params["fc2.weight"])


# --- bad input ----------------------------------------------------------------------------------------
def test_cross_entropy_label_out_of_range():
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        F.log_softmax_cross_entropy_forward(np.zeros((2, 3)), np.array([0, 3]))


def test_cross_entropy_float_labels():
    with pytest.raises(ValueError, match="labels must be integers"):
        F.log_softmax_cross_entropy_forward(np.zeros((2, 3)), np.array([0.0, 1.0]))


def test_cross_entropy_label_shape():
    with pytest.raises(ValueError, match=r"labels must have shape \(2,\)"):
        F.log_softmax_cross_entropy_forward(np.zeros((2, 3)), np.array([[0, 1]]))


def test_cross_entropy_nan_logits():
    with pytest.raises(ValueError, match="logits contains NaN"):
        F.log_softmax_cross_entropy_forward(np.array([[0.0, np.nan]]), np.array([0]))


def test_classifier_wrong_image_shape():
    with pytest.raises(ValueError, match=r"expects x of shape \(B, 1, 28, 28\)"):
        make_model("classifier").forward(np.zeros((2, 28, 28), np.float32))


def test_objective_without_labels():
    with pytest.raises(ValueError, match="needs labels"):
        ClassifierObjective(make_model("classifier")).step(np.zeros((2, 1, 28, 28), np.float32), None,
                                                           np.random.default_rng(0))


def test_objective_bad_shift():
    with pytest.raises(ValueError, match="shift must be an integer in"):
        ClassifierObjective(make_model("classifier"), dict(shift=20))

