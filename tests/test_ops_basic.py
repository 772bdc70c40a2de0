"""Gradient checks of the basic ops and of the MLP end to end (float64, central FD)."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.special import logsumexp

from refdiff.nn import functional as F
from refdiff.nn import make_model
from tests.helpers import TOL, assert_close, assert_fd, check_grads, examples, fd_grad, inner

F64 = TOL[np.dtype(np.float64)]

dims = st.integers(1, 6)


@settings(max_examples=examples(25), deadline=None)
@given(b=dims, d_in=dims, d_out=dims, bias=st.booleans(), seed=st.integers(0, 2**31))
def test_linear_grad(b, d_in, d_out, bias, seed):
    rng = np.random.default_rng(seed)
    x, w = rng.standard_normal((b, d_in)), rng.standard_normal((d_out, d_in))
    if bias:
        check_grads(F.linear_forward, F.linear_backward, [x, w, rng.standard_normal(d_out)], rng)
    else:
        fwd = lambda x, w: F.linear_forward(x, w, None)
        bwd = lambda dy, c: F.linear_backward(dy, c)[:2]
        check_grads(fwd, bwd, [x, w], rng)


@pytest.mark.parametrize("op", ["silu", "relu", "tanh", "sigmoid", "leaky_relu"])
@settings(max_examples=examples(15), deadline=None)
@given(shape=st.lists(dims, min_size=1, max_size=4), seed=st.integers(0, 2**31))
def test_activation_grad(op, shape, seed):
    rng = np.random.default_rng(seed)
    x = 3 * rng.standard_normal(shape)
    x[np.abs(x) < 1e-3] = 0.5          # keep FD away from the kinks of relu/leaky relu
    check_grads(getattr(F, op + "_forward"), getattr(F, op + "_backward"), [x], rng)


def test_activation_values():
    """Each forward against its textbook formula written with other NumPy functions (the
    gradient tests only tie backward to forward, so a wrong forward would pass them):
    float64, a few ulps apart: TOL[float64]."""
    x = np.linspace(-30, 30, 601)
    want = {"sigmoid": np.exp(-np.logaddexp(0, -x)), "silu": x * np.exp(-np.logaddexp(0, -x)),
            "relu": np.where(x > 0, x, 0.0), "tanh": np.sinh(x) / np.cosh(x),
            "leaky_relu": np.where(x > 0, x, 0.2 * x)}
    for op, w in want.items():
        assert_close(getattr(F, op + "_forward")(x)[0], w, name=op, **F64)
    z = x[:600].reshape(3, -1)
    assert_close(F.log_softmax_forward(z), z - logsumexp(z, axis=1, keepdims=True), name="log_softmax", **F64)


def test_linear_and_reparam_values():
    rng = np.random.default_rng(0)
    x, w, b = rng.standard_normal((4, 3)), rng.standard_normal((2, 3)), rng.standard_normal(2)
    want = np.array([[sum(x[i, k] * w[j, k] for k in range(3)) + b[j] for j in range(2)] for i in range(4)])
    assert_close(F.linear_forward(x, w, b)[0], want, name="linear", **F64)
    mu, lv, eps = rng.standard_normal((2, 3)), rng.standard_normal((2, 3)), rng.standard_normal((2, 3))
    assert_close(F.gaussian_reparam_forward(mu, lv, eps)[0], mu + np.sqrt(np.exp(lv)) * eps, name="reparam", **F64)


@pytest.mark.parametrize("op", ["silu", "sigmoid", "tanh"])
def test_activation_extremes_finite(op):
    x = np.array([-1e4, -80.0, 0.0, 80.0, 1e4], dtype=np.float32)
    y, cache = getattr(F, op + "_forward")(x)
    dx = getattr(F, op + "_backward")(np.ones_like(x), cache)
    assert y.dtype == np.float32 and np.all(np.isfinite(y)) and np.all(np.isfinite(dx))


@settings(max_examples=examples(20), deadline=None)
@given(b=dims, c1=dims, c2=dims, hw=st.lists(dims, min_size=0, max_size=2), seed=st.integers(0, 2**31))
def test_concat_and_channel_bias_grad(b, c1, c2, hw, seed):
    rng = np.random.default_rng(seed)
    a, c = rng.standard_normal([b, c1] + hw), rng.standard_normal([b, c2] + hw)
    check_grads(lambda a, c: F.concat_forward([a, c]), F.concat_backward, [a, c], rng)
    check_grads(F.add_channel_bias_forward, F.add_channel_bias_backward, [a, rng.standard_normal((b, c1))], rng)


def test_mse_grad():
    rng = np.random.default_rng(0)
    p, t, w = rng.standard_normal((4, 3)), rng.standard_normal((4, 3)), rng.uniform(0.5, 2, 4)
    loss, cache = F.mse_forward(p, t, w)
    assert_fd(F.mse_backward(cache), fd_grad(lambda: F.mse_forward(p, t, w)[0], p), name="mse grad")
    assert loss == pytest.approx(np.mean(w * np.sum((p - t) ** 2, axis=1)))


def test_time_embedding_matches_report_formula():
    # P[t, 2i] = sin(t / 10000^(2i/d)), P[t, 2i+1] = cos(t / 10000^(2i/d))  (report appendix)
    d, t = 10, np.array([0.0, 1.0, 7.0, 999.0])
    e = F.time_embedding(t, d, dtype=np.float64)
    for i in range(d // 2):
        assert_close(e[:, 2 * i], np.sin(t / 10000 ** (2 * i / d)), 1e-12, 1e-12)
        assert_close(e[:, 2 * i + 1], np.cos(t / 10000 ** (2 * i / d)), 1e-12, 1e-12)


def test_time_embedding_repeated_t_same_as_distinct():
    t = np.array([3.0, 5.0, 3.0, 3.0])
    e = F.time_embedding(t, 8)
    assert np.array_equal(e[0], e[2]) and np.array_equal(e[0], e[3]) and not np.array_equal(e[0], e[1])


@settings(max_examples=examples(6), deadline=None)
@given(b=st.integers(1, 4), dim=st.integers(1, 3), depth=st.integers(1, 3), seed=st.integers(0, 2**31))
def test_mlp_end_to_end_grads(b, dim, depth, seed):
    rng = np.random.default_rng(seed)
    m = make_model("mlp", dim=dim, widths=[5] * depth, emb_dim=6, temb_dim=4, dtype=np.float64, seed=seed % 1000)
    x, t = rng.standard_normal((b, dim)), rng.uniform(0, 1, b)
    dy = rng.standard_normal((b, dim))
    m.zero_grad()
    dx = m.backward(dy) if m.forward(x, t) is not None else None
    loss = lambda: inner(m.forward(x, t), dy)
    assert_fd(dx, fd_grad(loss, x), name="dx")
    for k, p in m.params.items():
        assert_fd(m.grads[k], fd_grad(loss, p), name=f"grad {k}")


def test_mlp_float32_stays_float32():
    m = make_model("mlp", dim=2)
    y = m.forward(np.zeros((3, 2), np.float32), np.full(3, 0.5, np.float32))
    assert y.dtype == np.float32
    assert m.backward(np.ones_like(y)).dtype == np.float32
    assert all(g.dtype == np.float32 for g in m.grads.values())


def test_mlp_grads_accumulate_and_zero():
    m = make_model("mlp", dim=2, dtype=np.float64)
    x, t = np.ones((2, 2)), np.array([0.1, 0.2])
    m.backward(m.forward(x, t))
    g1 = {k: v.copy() for k, v in m.grads.items()}
    m.backward(m.forward(x, t))
    assert all(np.allclose(m.grads[k], 2 * g1[k]) for k in g1)
    m.zero_grad()
    assert all(not np.any(v) for v in m.grads.values())


def test_leaky_relu_at_zero_takes_the_negative_slope():
    """x > 0 is the positive side (PyTorch's convention): at exactly 0 the gradient is the slope."""
    x = np.array([-1.0, 0.0, 2.0])
    y, cache = F.leaky_relu_forward(x, 0.1)
    np.testing.assert_array_equal(y, [-0.1, 0.0, 2.0])
    np.testing.assert_array_equal(F.leaky_relu_backward(np.ones(3), cache), [0.1, 0.1, 1.0])


def test_relu_at_zero_passes_no_gradient():
    """x > 0 is the active side (PyTorch's convention): at exactly 0 the gradient is 0."""
    y, cache = F.relu_forward(np.array([-1.0, 0.0, 2.0]))
    np.testing.assert_array_equal(y, [0.0, 0.0, 2.0])
    np.testing.assert_array_equal(F.relu_backward(np.ones(3), cache), [0.0, 0.0, 1.0])


def test_concat_backward_splits_three_parts():
    xs = [np.full((2, c, 1), float(c)) for c in (1, 2, 3)]
    y, cache = F.concat_forward(xs, axis=1)
    for dx, x in zip(F.concat_backward(y, cache), xs):
        np.testing.assert_array_equal(dx, x)


@pytest.mark.parametrize("op, w_shape, stride", [("conv2d", (4, 3, 3, 3), 1), ("conv_transpose2d", (3, 2, 3, 3), 2)])
def test_conv_without_bias_has_no_bias_gradient(op, w_shape, stride):
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((2, 3, 4, 4)), rng.standard_normal(w_shape)
    y, cache = getattr(F, op + "_forward")(x, w, None, stride, 1)
    dx, dw, db = getattr(F, op + "_backward")(rng.standard_normal(y.shape), cache)
    assert db is None and dx.shape == x.shape and dw.shape == w.shape


@pytest.mark.parametrize("groups", [True, 2.0, 0, 3])
def test_group_norm_refuses_groups_that_are_not_a_positive_integer_divisor(groups):
    x, p = np.zeros((2, 4, 3, 3)), np.ones(4)
    with pytest.raises(ValueError, match="num_groups must be a positive divisor of C = 4"):
        F.group_norm_forward(x, groups, p, p)


def test_group_norm_names_the_parameter_of_the_wrong_shape():
    x, p = np.zeros((2, 4, 3, 3)), np.ones(4)
    with pytest.raises(ValueError, match=r"^group_norm: gamma must have shape \(4,\)"):
        F.group_norm_forward(x, 2, np.ones(3), p)
    with pytest.raises(ValueError, match=r"^group_norm: beta must have shape \(4,\)"):
        F.group_norm_forward(x, 2, p, np.ones(3))


@pytest.mark.parametrize("stride, padding", [(1, 0), (1, 1), (2, 1)])
def test_conv2d_input_gradient_of_a_non_square_kernel(stride, padding):
    """A 3 x 2 kernel: the stride-1 route (dx as a convolution with the flipped kernel) is for
    square kernels only; every case must equal the adjoint, <dy, conv(x)> = <dx, x>."""
    rng = np.random.default_rng(2)
    x, w = rng.standard_normal((2, 3, 6, 5)), rng.standard_normal((4, 3, 3, 2))
    y, cache = F.conv2d_forward(x, w, None, stride, padding)
    dy = rng.standard_normal(y.shape)
    dx = F.conv2d_backward(dy, cache)[0]
    assert dx.shape == x.shape
    v = rng.standard_normal(x.shape)                 # linear in x: <dy, conv(v)> = <dx, v>
    assert float(np.sum(dy * F.conv2d_forward(v, w, None, stride, padding)[0])) == pytest.approx(
        float(np.sum(dx * v)), rel=1e-10)
