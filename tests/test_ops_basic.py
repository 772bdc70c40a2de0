"""Gradient checks of the basic ops and of the MLP end to end (float64, central FD)."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refdiff.nn import functional as F
from refdiff.nn import make_model
from tests.helpers import TOL, assert_close, check_grads, numerical_grad

dims = st.integers(1, 6)


@settings(max_examples=25, deadline=None)
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
@settings(max_examples=15, deadline=None)
@given(shape=st.lists(dims, min_size=1, max_size=4), seed=st.integers(0, 2**31))
def test_activation_grad(op, shape, seed):
    rng = np.random.default_rng(seed)
    x = 3 * rng.standard_normal(shape)
    x[np.abs(x) < 1e-3] = 0.5          # keep FD away from the kinks of relu/leaky relu
    check_grads(getattr(F, op + "_forward"), getattr(F, op + "_backward"), [x], rng)


@pytest.mark.parametrize("op", ["silu", "sigmoid", "tanh"])
def test_activation_extremes_finite(op):
    x = np.array([-1e4, -80.0, 0.0, 80.0, 1e4], dtype=np.float32)
    y, cache = getattr(F, op + "_forward")(x)
    dx = getattr(F, op + "_backward")(np.ones_like(x), cache)
    assert y.dtype == np.float32 and np.all(np.isfinite(y)) and np.all(np.isfinite(dx))


@settings(max_examples=20, deadline=None)
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
    num = numerical_grad(lambda: F.mse_forward(p, t, w)[0], p)
    assert_close(F.mse_backward(cache), num, name="mse grad", **TOL["fd64"])
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


@settings(max_examples=6, deadline=None)
@given(b=st.integers(1, 4), dim=st.integers(1, 3), depth=st.integers(1, 3), seed=st.integers(0, 2**31))
def test_mlp_end_to_end_grads(b, dim, depth, seed):
    rng = np.random.default_rng(seed)
    m = make_model("mlp", dim=dim, widths=[5] * depth, emb_dim=6, temb_dim=4, dtype=np.float64, seed=seed % 1000)
    x, t = rng.standard_normal((b, dim)), rng.uniform(0, 1, b)
    dy = rng.standard_normal((b, dim))
    m.zero_grad()
    dx = m.backward(dy) if m.forward(x, t) is not None else None
    loss = lambda: float(np.sum(m.forward(x, t) * dy))
    assert_close(dx, numerical_grad(loss, x), name="dx", **TOL["fd64"])
    for k, p in m.params.items():
        assert_close(m.grads[k], numerical_grad(loss, p), name=f"grad {k}", **TOL["fd64"])


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
