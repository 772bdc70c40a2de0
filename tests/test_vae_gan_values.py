"""The VAE's and GAN's building blocks by value, in float64 on tiny widths (the 784 pixels are
fixed by the architecture): the dense stack against the same chain written here in plain
NumPy (x W^T + b, max(0, .), leaky ReLU) with its backward written out by hand, and the
GAN's generator and discriminator pairs against central finite differences
(tests/helpers.py: tolerance from the step and the values' scale). Also the Model base's
`accumulate` and `check_input`.
"""
from __future__ import annotations

import numpy as np
import pytest

from refdiff.nn import functional as F
from refdiff.nn import make_model
from refdiff.nn.vae import PIXELS, dense_stack_backward, dense_stack_forward
from tests.helpers import TOL, assert_close, assert_fd, fd_vjp

T64 = TOL[np.dtype(np.float64)]
NAMES = ["a", "b", "c"]


def _stack(rng, widths):
    return {**{f"{n}.weight": rng.standard_normal((o, i)) for n, i, o in zip(NAMES, widths[:-1], widths[1:])},
            **{f"{n}.bias": rng.standard_normal(o) for n, o in zip(NAMES, widths[1:])}}


def _act(h, act, slope):
    return np.where(h > 0, h, 0.0 if act == "relu" else slope * h)


@pytest.mark.parametrize("act", ["relu", "leaky_relu"])
def test_dense_stack_against_plain_numpy(act):
    # bug caught: W instead of W^T, an activation after the last layer, leaky slope ignored,
    # a gradient sent to the wrong parameter name
    rng = np.random.default_rng(0)
    widths, slope = [5, 4, 3, 2], 0.3
    p, x, dy = _stack(rng, widths), rng.standard_normal((6, 5)), rng.standard_normal((6, 2))
    out, caches = dense_stack_forward(F, p, NAMES, x, act, slope)
    hs, h = [x], x                                  # by hand: inputs of each layer
    for i, n in enumerate(NAMES):
        z = h @ p[n + ".weight"].T + p[n + ".bias"]
        h = _act(z, act, slope) if i < 2 else z
        hs.append(z)
    assert_close(out, h, name="forward", **T64)
    grads = {}
    dx = dense_stack_backward(F, lambda k, g: grads.__setitem__(k, g), NAMES, dy, caches, act)
    d = dy                                         # by hand, from the last layer back
    for i in reversed(range(3)):
        n = NAMES[i]
        if i < 2:
            d = d * np.where(hs[i + 1] > 0, 1.0, 0.0 if act == "relu" else slope)
        inp = x if i == 0 else _act(hs[i], act, slope)
        assert_close(grads[n + ".weight"], d.T @ inp, name=n + ".weight", **T64)
        assert_close(grads[n + ".bias"], d.sum(0), name=n + ".bias", **T64)
        d = d @ p[n + ".weight"]
    assert_close(dx, d, name="dx", **T64)
    dx_only = dense_stack_backward(F, None, NAMES, dy, caches, act)    # no accumulate: input gradient only
    assert np.array_equal(dx_only, dx)


def test_vae_decode_is_the_decoder_chain():
    m = make_model("vae", hidden=(3, 2), latent=2, dtype=np.float64, seed=0)
    z = np.random.default_rng(1).standard_normal((4, 2))
    p = m.params
    h = np.maximum(z @ p["dec.0.weight"].T + p["dec.0.bias"], 0)          # latent -> 2 -> 3 -> 784
    h = np.maximum(h @ p["dec.1.weight"].T + p["dec.1.bias"], 0)
    logits = h @ p["dec.2.weight"].T + p["dec.2.bias"]
    got, _ = m.decode(z)
    assert got.shape == (4, PIXELS)
    assert_close(got, logits, name="logits", **T64)
    s = m.sample(3, np.random.default_rng(5))           # the decoder mean 2 sigmoid - 1 of z ~ N(0, I)
    z5 = np.random.default_rng(5).standard_normal((3, 2))
    assert_close(s.reshape(3, PIXELS), 2 / (1 + np.exp(-m.decode(z5)[0])) - 1, name="sample", **T64)


def _gan():
    return make_model("gan", z_dim=2, g_hidden=(3,), d_hidden=(3,), dtype=np.float64, seed=0)


def test_gan_generate_pair_values_and_gradients():
    # bug caught: tanh missing or its derivative wrong, G gradients landing in D's entries
    m, rng = _gan(), np.random.default_rng(0)
    z = rng.standard_normal((2, 2))
    img, cache = m.generate_forward(z)
    p = m.params
    h = np.maximum(z @ p["G.0.weight"].T + p["G.0.bias"], 0)
    assert_close(img.reshape(2, PIXELS), np.tanh(h @ p["G.1.weight"].T + p["G.1.bias"]), name="G(z)", **T64)
    dimg = rng.standard_normal(img.shape)
    m.zero_grad()
    dz = m.generate_backward(dimg, cache)
    fwd = lambda: m.generate_forward(z)[0]
    assert_fd(dz, fd_vjp(fwd, dimg, z), "dz")
    assert_fd(m.grads["G.0.weight"], fd_vjp(fwd, dimg, m.params["G.0.weight"]), "G.0.weight")
    assert_fd(m.grads["G.1.bias"][:5], fd_vjp(fwd, dimg, m.params["G.1.bias"][:5]), "G.1.bias")
    assert all(not m.grads[k].any() for k in m.grads if k.startswith("D."))


def test_gan_discriminate_backward_values_and_accumulate_flag():
    m, rng = _gan(), np.random.default_rng(1)
    x = rng.uniform(-1, 1, (3, 1, 28, 28))
    logit, cache = m.discriminate_forward(x)
    p = m.params
    h = x.reshape(3, PIXELS) @ p["D.0.weight"].T + p["D.0.bias"]
    h = np.where(h > 0, h, 0.2 * h)
    assert_close(logit, h @ p["D.1.weight"].T + p["D.1.bias"], name="D(x)", **T64)
    dl = rng.standard_normal(logit.shape)
    m.zero_grad()
    dx = m.discriminate_backward(dl, cache, accumulate=False)       # the G step through D
    assert dx.shape == x.shape and not any(g.any() for g in m.grads.values())
    fwd = lambda: m.discriminate_forward(x)[0]
    assert_fd(dx[0, 0, 0, :6], fd_vjp(fwd, dl, x[0, 0, 0, :6]), "dx")
    dx2 = m.discriminate_backward(dl, m.discriminate_forward(x)[1])
    assert np.array_equal(dx2, dx)
    assert_fd(m.grads["D.1.weight"], fd_vjp(fwd, dl, m.params["D.1.weight"]), "D.1.weight")
    assert all(not m.grads[k].any() for k in m.grads if k.startswith("G."))


def test_model_accumulate_adds():
    # bug caught: accumulate overwriting (two losses into one step would keep only the last)
    m = _gan()
    g = np.random.default_rng(0).standard_normal(m.grads["D.1.bias"].shape)
    m.zero_grad()
    m.accumulate("D.1.bias", g)
    m.accumulate("D.1.bias", 2 * g)
    assert np.array_equal(m.grads["D.1.bias"], 3 * g)


def test_model_add_param_casts_and_pairs_a_zero_gradient():
    # bug caught: a float64 array kept in a float32 model, or a gradient sharing the parameter's memory
    m = make_model("mlp", dim=2, widths=(3,), seed=0)
    v = np.arange(6, dtype=np.float64).reshape(2, 3) / 3
    m.add_param("extra", v)
    assert m.params["extra"].dtype == np.float32 and np.array_equal(m.params["extra"], v.astype(np.float32))
    assert m.grads["extra"].shape == (2, 3) and not m.grads["extra"].any()
    assert not np.shares_memory(m.params["extra"], v) and not np.shares_memory(m.grads["extra"], m.params["extra"])


def test_model_check_input_messages():
    m = make_model("mlp", dim=2, widths=(3,), seed=0)
    x = np.zeros((4, 2))
    m.check_input(x, (2,), np.zeros(4))                # fine: nothing raised, nothing changed
    assert not x.any()
    cases = [((np.zeros((4, 3)), (2,), None), r"^model 'mlp' expects x of shape \(B, 2\); got \(4, 3\)$"),
             ((np.zeros(4), (2,), None), r"expects x of shape \(B, 2\); got \(4,\)$"),
             ((np.array([[0.0, np.inf]]), (2,), None), r"^model 'mlp': x contains NaN or Inf$"),
             ((x, (2,), np.zeros(3)), r"^model 'mlp' expects t of shape \(4,\); got \(3,\)$"),
             ((x, (2,), np.zeros((4, 1))), r"expects t of shape \(4,\); got \(4, 1\)$")]
    for args, msg in cases:
        with pytest.raises(ValueError, match=msg):
            m.check_input(*args)
