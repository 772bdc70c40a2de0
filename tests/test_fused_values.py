"""The reference fused pairs (refdiff/nn/fused.py) by value, float64, without the numba backend:
the forward against the definition written here with other NumPy code (GroupNorm from its
formula, the convolution one output pixel at a time by conv2d_naive_forward, SiLU as
x sigmoid(x)), and every gradient of the backward against central differences. (The backends'
versions are held to these pairs by tests/test_fused_ops.py; a backend's version 1 runs this
very composition, so those comparisons cannot see a mistake in it.)"""
import numpy as np
import pytest

from refdiff.nn import fused
from refdiff.nn.conv import conv2d_naive_forward
from tests.helpers import assert_close, assert_fd, fd_vjp


def silu(a):
    return a / (1.0 + np.exp(-a))


def group_norm(x, G, gamma, beta, eps):
    B, C = x.shape[:2]
    g = x.reshape(B, G, -1)
    y = (g - g.mean(axis=2, keepdims=True)) / np.sqrt(g.var(axis=2, keepdims=True) + eps)
    return y.reshape(x.shape) * gamma[None, :, None, None] + beta[None, :, None, None]


def _case(seed, B=2, cin=4, cout=3, size=5):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((B, cin, size, size)) + 0.5
    w = rng.standard_normal((cout, cin, 3, 3)) / 3.0
    b = rng.standard_normal(cout)
    gamma, beta = 1 + 0.5 * rng.standard_normal(cin), rng.standard_normal(cin)
    shift = rng.standard_normal((B, cin))
    return rng, x, w, b, gamma, beta, shift


@pytest.mark.parametrize("stride, padding", [(1, 1), (2, 0)])
def test_conv2d_silu_values(stride, padding):
    rng, x, w, b, *_ = _case(1)
    y, cache = fused.conv2d_silu_forward(x, w, b, stride, padding)
    assert_close(y, silu(conv2d_naive_forward(x, w, b, stride, padding)[0]), rtol=1e-12, atol=1e-12, name="y")
    dy = rng.standard_normal(y.shape)
    dx, dw, db = fused.conv2d_silu_backward(dy, cache)
    f = lambda: fused.conv2d_silu_forward(x, w, b, stride, padding)[0]
    for name, a, g in (("dx", x, dx), ("dw", w, dw), ("db", b, db)):
        assert_fd(g, fd_vjp(f, dy, a), name=name)


@pytest.mark.parametrize("silu_in, silu_out, with_shift, eps", [(False, False, False, 1e-5), (True, False, True, 0.5),
                                                                (False, True, True, 1e-5), (True, True, False, 0.5)])
def test_group_norm_conv2d_values(silu_in, silu_out, with_shift, eps):
    rng, x, w, b, gamma, beta, shift = _case(2)
    shift = shift if with_shift else None
    G = 2
    kw = dict(stride=1, padding=1, silu_in=silu_in, silu_out=silu_out, eps=eps)
    y, cache = fused.group_norm_conv2d_forward(x, G, gamma, beta, w, b, shift, **kw)
    h = group_norm(x + (0 if shift is None else shift[:, :, None, None]), G, gamma, beta, eps)
    h = conv2d_naive_forward(silu(h) if silu_in else h, w, b, 1, 1)[0]
    assert_close(y, silu(h) if silu_out else h, rtol=1e-12, atol=1e-12, name="y")

    dy = rng.standard_normal(y.shape)
    grads = fused.group_norm_conv2d_backward(dy, cache)
    assert len(grads) == 6
    f = lambda: fused.group_norm_conv2d_forward(x, G, gamma, beta, w, b, shift, **kw)[0]
    for name, a, g in zip(("dx", "dgamma", "dbeta", "dw", "db", "dshift"), (x, gamma, beta, w, b, shift), grads):
        if a is None:
            assert g is None, f"{name}: no shift, so no gradient"
            continue
        assert_fd(g, fd_vjp(f, dy, a), name=name)


def test_defaults():
    """stride 1, padding 0, no SiLU, eps 1e-5, no shift: the defaults written out give the same arrays."""
    _, x, w, b, gamma, beta, _ = _case(3)
    np.testing.assert_array_equal(fused.conv2d_silu_forward(x, w, b)[0],
                                  fused.conv2d_silu_forward(x, w, b, stride=1, padding=0)[0])
    np.testing.assert_array_equal(fused.group_norm_conv2d_forward(x, 2, gamma, beta, w, b)[0],
                                  fused.group_norm_conv2d_forward(x, 2, gamma, beta, w, b, None, stride=1, padding=0,
                                                                  silu_in=False, silu_out=False, eps=1e-5)[0])


def test_fused_ops_of_a_backend_without_them():
    # fused_ops of the reference namespace: the compositions bound to its ops, same values
    from refdiff.backend import REFERENCE
    ns = fused.fused_ops(REFERENCE)
    _, x, w, b, gamma, beta, shift = _case(3)
    np.testing.assert_array_equal(ns.conv2d_silu_forward(x, w, b, 1, 1)[0], fused.conv2d_silu_forward(x, w, b, 1, 1)[0])
    np.testing.assert_array_equal(ns.group_norm_conv2d_forward(x, 2, gamma, beta, w, b, shift, 1, 1, True, True)[0],
                                  fused.group_norm_conv2d_forward(x, 2, gamma, beta, w, b, shift, 1, 1, True, True)[0])


def test_compositions_call_the_ops_in_the_documented_order():
    # *_with(ops, ...) on a namespace that records each op called and runs the reference's:
    # the order of the module docstring, forward and reverse, and the reference's values
    from refdiff.backend import REFERENCE

    calls = []

    class Recording:
        def __getattr__(self, name):
            f = getattr(REFERENCE, name)
            return lambda *a, **k: calls.append(name) or f(*a, **k)

    ops = Recording()
    _, x, w, b, gamma, beta, shift = _case(4)
    y, cache = fused.group_norm_conv2d_forward_with(ops, x, 2, gamma, beta, w, b, shift, 1, 1, True, True)
    assert calls == ["add_channel_bias_forward", "group_norm_forward", "silu_forward", "conv2d_forward",
                     "silu_forward"]
    np.testing.assert_array_equal(y, fused.group_norm_conv2d_forward(x, 2, gamma, beta, w, b, shift, 1, 1, True, True)[0])
    calls.clear()
    fused.group_norm_conv2d_backward_with(ops, np.ones_like(y), cache)
    assert calls == ["silu_backward", "conv2d_backward", "silu_backward", "group_norm_backward",
                     "add_channel_bias_backward"]
    calls.clear()
    y, cache = fused.conv2d_silu_forward_with(ops, x, w, b, 1, 1)
    fused.conv2d_silu_backward_with(ops, np.ones_like(y), cache)
    assert calls == ["conv2d_forward", "silu_forward", "silu_backward", "conv2d_backward"]
