"""spatial_attention, upsample_nearest2x, dropout (refdiff.nn.attention): finite-difference
gradient checks (float64), the naive twin, closed forms at extreme magnitudes, dropout's
statistics, bad arguments."""
import math

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from refdiff.nn import functional as F
from tests.helpers import EPS64, TOL, assert_close, assert_fd, check_grads, examples, fd_vjp

small = st.integers(1, 3)
seeds = st.integers(0, 2**31)
F64, F32 = np.dtype(np.float64), np.dtype(np.float32)


@st.composite
def attention_case(draw):
    """B, heads, d (channels per head), H, W: N = H W = 1 included, and N > 1."""
    return dict(B=draw(st.integers(1, 2)), heads=draw(small), d=draw(small), H=draw(small), W=draw(small),
                seed=draw(seeds))


def _qkv(c, rng=None):
    rng = rng or np.random.default_rng(c["seed"])
    C = c["heads"] * c["d"]
    return rng.standard_normal((c["B"], 3 * C, c["H"], c["W"])), rng


def _heads(qkv, heads):
    """(q, k, v), each (B, heads, d, N): the channel layout the module docstring gives."""
    B, C3, H, W = qkv.shape
    parts = qkv.reshape(B, 3, heads, C3 // 3 // heads, H * W)
    return parts[:, 0], parts[:, 1], parts[:, 2]


# --- spatial attention ----------------------------------------------------------------------------
@settings(max_examples=examples(30), deadline=None)
@given(c=attention_case())
def test_spatial_attention_matches_naive(c):
    qkv, _ = _qkv(c)
    ref, _ = F.spatial_attention_naive_forward(qkv, c["heads"])
    y, _ = F.spatial_attention_forward(qkv, c["heads"])
    assert y.shape == (c["B"], c["heads"] * c["d"], c["H"], c["W"]) and y.dtype == F64
    assert_close(y, ref, name="attention float64 vs naive", **TOL[F64])
    y32, _ = F.spatial_attention_forward(qkv.astype(np.float32), c["heads"])
    assert y32.dtype == np.float32
    assert_close(y32, ref, name="attention float32 vs float64 naive", **TOL[F32])


def test_spatial_attention_one_position_returns_v():
    # N = 1: softmax over one key is 1, whatever q and k: y = v exactly
    rng = np.random.default_rng(0)
    qkv = 5 * rng.standard_normal((2, 6, 1, 1))
    y, _ = F.spatial_attention_forward(qkv, 2)
    np.testing.assert_array_equal(y, qkv[:, 4:])


@settings(max_examples=examples(25), deadline=None)
@given(c=attention_case())
def test_spatial_attention_grad(c):
    qkv, rng = _qkv(c)
    y, cache = F.spatial_attention_forward(qkv, c["heads"])
    dy = rng.standard_normal(y.shape)
    dqkv = F.spatial_attention_backward(dy, cache)
    assert dqkv.shape == qkv.shape
    # FD rounding: each y[:, n] = sum_m a_m v_m with a = exp(s - max s) / sum, and exp rounds
    # s - max s to u |s| absolute, so y is off by ~u |v| (2 + max|s|) even where it cancels to
    # ~0; a perturbation of k or v changes every output of its head, so all of them count.
    q, k, v = _heads(qkv, c["heads"])
    s_max = float(np.abs(q.transpose(0, 1, 3, 2) @ k).max()) / math.sqrt(c["d"])
    scale = (2 + s_max) * float(np.abs(v).max()) * float(np.abs(dy).sum())
    assert_fd(dqkv, fd_vjp(lambda: F.spatial_attention_forward(qkv, c["heads"])[0], dy, qkv, scale=scale),
              name="d qkv")


@settings(max_examples=examples(20), deadline=None)
@given(c=attention_case(), big=st.sampled_from([1e2, 1e4]))
def test_spatial_attention_row_shift_invariance_at_overflowing_scores(c, big):
    """A channel with q = k = big in every head adds big^2 / sqrt(d) to every score of a row:
    exp of those scores overflows, but softmax is invariant to a shift of its row, so y must
    equal the direct, unshifted formula exp(S) / sum exp(S) of the remaining channels.
    Rounding: s - max s loses u big^2 / sqrt(d) in absolute terms, so y errs by that times |v|."""
    c = dict(c, d=c["d"] + 1)
    qkv, rng = _qkv(c)
    q, k, v = _heads(qkv, c["heads"])            # views into qkv
    q[:, :, 0], k[:, :, 0] = big, big
    S = (q.transpose(0, 1, 3, 2) @ k) / math.sqrt(c["d"])
    with np.errstate(over="ignore"):
        assert np.isinf(np.exp(S)).any(), "the test needs scores where a naive softmax overflows"
    y, cache = F.spatial_attention_forward(qkv, c["heads"])
    assert np.isfinite(y).all()
    S_small = (q[:, :, 1:].transpose(0, 1, 3, 2) @ k[:, :, 1:]) / math.sqrt(c["d"])
    A = np.exp(S_small) / np.exp(S_small).sum(axis=-1, keepdims=True)
    ref = (v @ A.transpose(0, 1, 3, 2)).reshape(y.shape)
    err = 16 * EPS64 * big ** 2 / math.sqrt(c["d"]) * float(np.abs(v).max())
    assert_close(y, ref, name="attention at overflowing scores", rtol=0, atol=err / max(float(np.abs(ref).max()), 1e-300))
    assert np.isfinite(F.spatial_attention_backward(rng.standard_normal(y.shape), cache)).all()


@settings(max_examples=examples(20), deadline=None)
@given(c=attention_case())
def test_spatial_attention_saturated_is_hard_attention(c):
    """Scores of size 1e6 with gaps > 745 between the best and the second best key of each
    query: exp(-gap) underflows to 0, so the softmax is exactly one-hot and y[:, n] is v at the
    argmax key, exactly; the softmax's Jacobian is then 0, so dq = dk = 0 and dv[:, m] sums dy
    over the queries whose argmax is m."""
    qkv, rng = _qkv(c)
    q, k, v = _heads(qkv, c["heads"])
    q *= 1e3
    k *= 1e3
    S = (q.transpose(0, 1, 3, 2) @ k) / math.sqrt(c["d"])             # (B, heads, N, N)
    top = np.sort(S, axis=-1)
    assume(c["H"] * c["W"] == 1 or float((top[..., -1] - top[..., -2]).min()) > 745)
    y, cache = F.spatial_attention_forward(qkv, c["heads"])
    onehot = (S == S.max(axis=-1, keepdims=True)).astype(np.float64)
    np.testing.assert_array_equal(y, (v @ onehot.transpose(0, 1, 3, 2)).reshape(y.shape))
    dy = rng.standard_normal(y.shape)
    dq, dk, dv = _heads(F.spatial_attention_backward(dy, cache), c["heads"])
    np.testing.assert_array_equal(dq, 0)
    np.testing.assert_array_equal(dk, 0)
    assert_close(dv, dy.reshape(dv.shape) @ onehot, name="dv of hard attention", **TOL[F64])


@pytest.mark.parametrize("heads, shape, match", [
    (0, (1, 6, 2, 2), "heads must be an integer >= 1"),
    (-1, (1, 6, 2, 2), "heads must be an integer >= 1"),
    (1.5, (1, 6, 2, 2), "heads must be an integer >= 1"),
    (True, (1, 6, 2, 2), "heads must be an integer >= 1"),
    ("2", (1, 6, 2, 2), "heads must be an integer >= 1"),
    (3, (1, 6, 2, 2), "heads=3 must divide the C=2"),
    (1, (1, 5, 2, 2), r"qkv must have shape \(B, 3C, H, W\)"),
    (1, (6, 2, 2), r"qkv must have shape \(B, 3C, H, W\)"),
])
def test_spatial_attention_bad_input(heads, shape, match):
    for fn in (F.spatial_attention_forward, F.spatial_attention_naive_forward):
        with pytest.raises(ValueError, match=match):
            fn(np.zeros(shape), heads)


# --- upsample_nearest2x -----------------------------------------------------------------------------
@settings(max_examples=examples(20), deadline=None)
@given(B=small, C=small, H=small, W=small, seed=seeds)
def test_upsample_nearest2x(B, C, H, W, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((B, C, H, W))
    y, _ = F.upsample_nearest2x_forward(x)
    # independent definition: the Kronecker product of each map with a 2 x 2 block of ones
    np.testing.assert_array_equal(y, np.kron(x, np.ones((1, 1, 2, 2))))
    assert F.upsample_nearest2x_forward(x.astype(np.float32))[0].dtype == np.float32
    check_grads(F.upsample_nearest2x_forward, F.upsample_nearest2x_backward, [x], rng)


def test_upsample_nearest2x_bad_input():
    for shape in [(2, 3), (1, 2, 3), (1, 1, 2, 2, 2)]:
        with pytest.raises(ValueError, match=r"upsample_nearest2x: x must have shape \(B, C, H, W\)"):
            F.upsample_nearest2x_forward(np.zeros(shape))


# --- dropout ------------------------------------------------------------------------------------------
@settings(max_examples=examples(20), deadline=None)
@given(shape=st.lists(small, min_size=1, max_size=4), p=st.sampled_from([0.0, 0.1, 0.5, 0.9]), seed=seeds)
def test_dropout_grad_with_a_fixed_mask(shape, p, seed):
    # a fresh generator of the same seed per evaluation: every call draws the same mask, so
    # the forward is a fixed linear map and its backward must be that map's transpose
    # (p = 0 returns x itself, not a copy, and the finite differences perturb x in place: copy y)
    x = np.random.default_rng(seed + 1).standard_normal(shape)

    def fwd(x):
        y, cache = F.dropout_forward(x, p, np.random.default_rng(seed))
        return y.copy(), cache
    check_grads(fwd, F.dropout_backward, [x], np.random.default_rng(seed + 2))


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_dropout_mask_is_the_documented_host_draw(dtype):
    # the spec every backend follows: keep = rng.random(x.shape) >= p, kept values x / (1 - p)
    p, shape = 0.3, (3, 4, 5)
    x = np.random.default_rng(1).standard_normal(shape).astype(dtype)
    y, _ = F.dropout_forward(x, p, np.random.default_rng(7))
    keep = np.random.default_rng(7).random(shape) >= p
    assert y.dtype == dtype
    np.testing.assert_array_equal(y[~keep], 0)
    assert_close(y[keep], x[keep].astype(np.float64) / (1 - p), name="kept values", **TOL[np.dtype(dtype)])


def test_dropout_p0_is_the_identity_and_draws_nothing():
    x = np.random.default_rng(0).standard_normal((2, 3, 4))
    rng = np.random.default_rng(5)
    before = rng.bit_generator.state
    for p in (0, 0.0):
        y, cache = F.dropout_forward(x, p, rng)
        np.testing.assert_array_equal(y, x)
        dy = np.random.default_rng(1).standard_normal(x.shape)
        np.testing.assert_array_equal(F.dropout_backward(dy, cache), dy)
    assert rng.bit_generator.state == before, "p = 0 must not advance the generator"
    np.testing.assert_array_equal(F.dropout_forward(x, 0.0, None)[0], x)    # and needs none


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_statistics(p):
    """Over n = 200,000 entries: the kept count is Binomial(n, 1 - p), so its share is within
    6 sd, 6 sqrt(p (1 - p) / n), of 1 - p (a false alarm once in 5e8 runs); each y_i has mean
    x_i and variance x_i^2 p / (1 - p), so sum(y - x) is within 6 sqrt(sum x^2 p / (1 - p))
    of 0: the inverted scaling preserves the mean in expectation."""
    n = 200_000
    x = np.random.default_rng(3).standard_normal(n) + 1
    y, _ = F.dropout_forward(x, p, np.random.default_rng(4))
    kept = np.count_nonzero(y) / n
    assert abs(kept - (1 - p)) <= 6 * math.sqrt(p * (1 - p) / n), f"kept share {kept} vs {1 - p}"
    dev = float(np.sum(y - x))
    assert abs(dev) <= 6 * math.sqrt(float(np.sum(x * x)) * p / (1 - p)), f"sum(y - x) = {dev}"


@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5, float("nan"), True, "0.1", None])
def test_dropout_bad_p(p):
    with pytest.raises(ValueError, match="dropout: p must be a number in"):
        F.dropout_forward(np.zeros(3), p, np.random.default_rng(0))


@pytest.mark.parametrize("rng", [None, 42, np.random.RandomState(0)])
def test_dropout_bad_rng(rng):
    with pytest.raises(TypeError, match="dropout: rng must be a numpy.random.Generator"):
        F.dropout_forward(np.zeros(3), 0.5, rng)
