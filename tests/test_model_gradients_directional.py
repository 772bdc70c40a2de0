"""The VAE's, the GAN's and the classifier's whole-network gradients by directional finite
differences: for each parameter tensor p, sum(grad_p * v) against (L(p + h v) - L(p - h v)) / 2h
for a random direction v (tests/helpers.py: fd_direction, assert_fd's derived bound).

Two loss evaluations per tensor instead of two per sampled entry (test_vae_gan.py and
test_classifier.py check sampled entries one by one through the same networks, in tests that
take seconds each): every entry of the gradient enters the sum, so a wrong entry, a missing
term or a transposed weight gradient moves it (unless the error is orthogonal to a random v).
Tensors a loss must not reach get exactly zero gradient.

Step: H = FD_STEP / 100. A direction moves every pre-activation of the network at once, and
one of them crossing a ReLU or max-pool kink inside (-h, h) breaks central differences (with
FD_STEP that happened for the classifier's conv2 weights: 0.2 % off); the chance is
proportional to h. fd_direction's rounding bound, FD_ROUND u |L| / h, grows to ~2e-7 |L|,
still far below what a wrong gradient term costs.
"""
import numpy as np
import pytest

from refdiff.nn import functional as F
from refdiff.nn import make_model
from refdiff.objectives import ClassifierObjective, GANObjective, VAEObjective
from tests.helpers import FD_STEP, assert_fd, fd_direction
from tests.test_vae_gan import _images, vae_loss_input_grad

H = FD_STEP / 100


def _value(out):
    return out[0] if isinstance(out, tuple) else out


def _check_directions(model, loss_and_grad, rng, keys):
    _value(loss_and_grad())
    grads = {k: g.copy() for k, g in model.grads.items()}
    for k, p in model.params.items():
        if k not in keys:
            assert not np.any(grads[k]), f"{k} should get no gradient from this loss"
            continue
        v = rng.standard_normal(p.shape)
        assert_fd(np.sum(grads[k] * v), fd_direction(lambda: _value(loss_and_grad()), p, v, h=H),
                  name=f"d loss / d {k} along a random direction")


def test_vae_gradients_along_random_directions():
    rng = np.random.default_rng(0)
    m = make_model("vae", dtype=np.float64, seed=1)
    x, eps = _images(rng, 2), rng.standard_normal((2, 16))
    obj = VAEObjective(m)
    _check_directions(m, lambda: obj.loss_and_grad(x, eps), rng, set(m.params))
    # the total input gradient (the model's backward plus x's path through the BCE target)
    v = rng.standard_normal(x.shape)
    assert_fd(np.sum(vae_loss_input_grad(m, x, eps) * v),
              fd_direction(lambda: obj.loss_and_grad(x, eps)[0], x, v, h=H), name="d loss / d x along v")


@pytest.mark.parametrize("loss", ["discriminator", "generator"])
def test_gan_gradients_along_random_directions(loss):
    rng = np.random.default_rng(1)
    m = make_model("gan", dtype=np.float64, seed=2)
    obj = GANObjective(m)
    x, z = _images(rng, 2), rng.standard_normal((2, 64))
    d_keys = {k for k in m.params if k.startswith("D.")}
    if loss == "discriminator":
        _check_directions(m, lambda: obj.d_loss_and_grad(x, z), rng, d_keys)
    else:
        _check_directions(m, lambda: obj.g_loss_and_grad(z), rng, set(m.params) - d_keys)


def test_classifier_gradients_along_random_directions():
    rng = np.random.default_rng(0)
    m = make_model("classifier", dtype=np.float64, seed=1)
    obj = ClassifierObjective(m)
    x, y = rng.uniform(-1, 1, (2, 1, 28, 28)), np.array([3, 7])
    _check_directions(m, lambda: obj.loss_and_grad(x, y), rng, set(m.params))
    m.zero_grad()
    logits = m.forward(x)
    dx = m.backward(F.log_softmax_cross_entropy_backward(1.0, F.log_softmax_cross_entropy_forward(logits, y)[1]))
    v = rng.standard_normal(x.shape)
    assert_fd(np.sum(dx * v), fd_direction(lambda: obj.loss_and_grad(x, y)[0], x, v, h=H), name="d loss / d x along v")
