"""Tangent pairs of the modern UNet's ops (refdiff.nn.tangent: upsample_nearest2x, dropout,
spatial_attention) and their wiring into TangentOps, float64.

As in tests/test_tangent.py (its check_jvp): the tangent agrees with central differences of
the primal along xdot, the primal output is the primal op's unchanged, and the adjoint agrees
with central differences of S = <y, dy> + <ydot, dydot> with respect to x and xdot (random
dy, dydot). Dropout is checked for a fixed generator seed: every evaluation draws the same
mask, so the op is a fixed linear map; its tangent must use the forward's one draw.
"""
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refdiff.backend import REFERENCE
from refdiff.nn import functional as F
from refdiff.nn import tangent as T
from refdiff.nn.unet_jvp import Dual, TangentOps
from tests.helpers import EPS64, TOL, assert_close, examples
from tests.test_tangent import check_jvp

small = st.integers(1, 3)
seeds = st.integers(0, 2**31)
F64, F32 = np.dtype(np.float64), np.dtype(np.float32)


def _heads(a, heads):
    """(q, k, v), each (B, heads, d, N): the channel layout of refdiff.nn.attention."""
    B, C3, H, W = a.shape
    parts = a.reshape(B, 3, heads, C3 // 3 // heads, H * W)
    return parts[:, 0], parts[:, 1], parts[:, 2]


# --- linear ops ---------------------------------------------------------------------------------------
@settings(max_examples=examples(15), deadline=None)
@given(shape=st.tuples(small, small, small, small), seed=seeds)
def test_upsample_nearest2x_jvp(shape, seed):
    rng = np.random.default_rng(seed)
    x, xdot = rng.standard_normal(shape), rng.standard_normal(shape)
    check_jvp(T.upsample_nearest2x_jvp_forward, T.upsample_nearest2x_jvp_backward,
              lambda x: F.upsample_nearest2x_forward(x)[0], x, xdot, [], rng)


@settings(max_examples=examples(20), deadline=None)
@given(shape=st.lists(small, min_size=1, max_size=4), p=st.sampled_from([0.0, 0.2, 0.7]), seed=seeds)
def test_dropout_jvp_with_a_fixed_mask(shape, p, seed):
    rng = np.random.default_rng(seed + 1)
    x, xdot = rng.standard_normal(shape), rng.standard_normal(shape)
    draw = lambda: np.random.default_rng(seed)     # the same mask at every evaluation
    check_jvp(lambda x, xd: T.dropout_jvp_forward(x, xd, p, draw()), T.dropout_jvp_backward,
              lambda x: F.dropout_forward(x, p, draw())[0], x, xdot, [], rng)


@pytest.mark.parametrize("p", [0.0, 0.5])
def test_dropout_jvp_draws_the_mask_once(p):
    """The tangent is the same draw applied to xdot: ydot equals the primal op on xdot with
    the same seed, and the generator ends where one primal forward leaves it (a second draw
    for the tangent would both change ydot and advance it further)."""
    shape = (2, 3, 4, 5)
    x, xdot = np.random.default_rng(0).standard_normal((2,) + shape)
    rng, ref_rng = np.random.default_rng(9), np.random.default_rng(9)
    y, ydot, _ = T.dropout_jvp_forward(x, xdot, p, rng)
    np.testing.assert_array_equal(y, F.dropout_forward(x, p, ref_rng)[0])
    assert rng.bit_generator.state == ref_rng.bit_generator.state
    np.testing.assert_array_equal(ydot, F.dropout_forward(xdot, p, np.random.default_rng(9))[0])
    if p:
        np.testing.assert_array_equal(ydot == 0, y == 0)              # the same entries dropped


# --- spatial attention ----------------------------------------------------------------------------------
@st.composite
def attention_case(draw):
    return dict(B=draw(st.integers(1, 2)), heads=draw(small), d=draw(small), H=draw(small), W=draw(small),
                seed=draw(seeds))


def _arrays(c):
    rng = np.random.default_rng(c["seed"])
    shape = (c["B"], 3 * c["heads"] * c["d"], c["H"], c["W"])
    return rng.standard_normal(shape), rng.standard_normal(shape), rng


@settings(max_examples=examples(25), deadline=None)
@given(c=attention_case())
def test_spatial_attention_jvp(c):
    qkv, qkvdot, rng = _arrays(c)
    heads = c["heads"]
    # FD rounding: softmax rounds s - max s to u |s| absolute, so y and ydot (sums of A and Adot
    # = A P times v and vdot) are off by ~u (2 + max|s|) (|v| + |vdot| + |v| max|P|) even where
    # they cancel to ~0: that is the scale of the values each output is computed from.
    q, k, v = _heads(qkv, heads)
    qd, kd, vd = _heads(qkvdot, heads)
    sq = 1 / math.sqrt(c["d"])
    s_max = float(np.abs(q.transpose(0, 1, 3, 2) @ k).max()) * sq
    p_max = 2 * float(np.abs(qd.transpose(0, 1, 3, 2) @ k).max() + np.abs(q.transpose(0, 1, 3, 2) @ kd).max()) * sq
    scale = (2 + s_max) * (float(np.abs(v).max()) * (1 + p_max) + float(np.abs(vd).max()))
    check_jvp(lambda x, xd: T.spatial_attention_jvp_forward(x, xd, heads), T.spatial_attention_jvp_backward,
              lambda x: F.spatial_attention_forward(x, heads)[0], qkv, qkvdot, [], rng, scale=scale)


def test_spatial_attention_jvp_one_position():
    # N = 1: y = v whatever q and k, so ydot = vdot, and the gradients reach v and vdot only
    rng = np.random.default_rng(0)
    qkv, qkvdot = rng.standard_normal((2, 2, 6, 1, 1))
    y, ydot, cache = T.spatial_attention_jvp_forward(qkv, qkvdot, 2)
    np.testing.assert_array_equal(ydot, qkvdot[:, 4:])
    dy, dydot = rng.standard_normal((2,) + y.shape)
    dx, dxdot = T.spatial_attention_jvp_backward(dy, dydot, cache)
    np.testing.assert_array_equal(dx, np.concatenate([0 * dy, 0 * dy, dy], axis=1))
    np.testing.assert_array_equal(dxdot, np.concatenate([0 * dy, 0 * dy, dydot], axis=1))


@settings(max_examples=examples(10), deadline=None)
@given(c=attention_case())
def test_spatial_attention_jvp_at_overflowing_scores(c):
    """A channel with q = k = big (tangent 0) adds big^2 / sqrt(d) to every score of a row,
    past exp's overflow; softmax ignores a row's shift, so y, ydot and the gradients equal
    those with that channel at 0, except the gradients of q and k in that channel (their
    Jacobian is the shift's own). Rounding: s - max s loses u big^2 / sqrt(d) absolute, which
    moves A and Adot by that relative amount; the outputs and gradients are sums of at most
    d N products of A, Adot with up to three inputs of size m, so they move by at most
    u big^2 / sqrt(d) (1 + max|P|) d N m^3 each (times 16 for the few roundings per term)."""
    big = 1e2
    c = dict(c, d=c["d"] + 1, H=c["H"] + 1)          # N >= 2: one position has no scores to shift
    qkv, qkvdot, rng = _arrays(c)
    out = {}
    for shift in (big, 0.0):
        a = qkv.copy()
        q, k, _ = _heads(a, c["heads"])
        q[:, :, 0], k[:, :, 0] = shift, shift
        ad = qkvdot.copy()
        qd, kd, _ = _heads(ad, c["heads"])
        qd[:, :, 0], kd[:, :, 0] = 0, 0
        y, ydot, cache = T.spatial_attention_jvp_forward(a, ad, c["heads"])
        g = T.spatial_attention_jvp_backward(*np.random.default_rng(1).standard_normal((2,) + y.shape), cache)
        out[shift] = [y, ydot] + [_heads(x, c["heads"]) for x in g]
    for a in out[big][:2]:
        assert np.isfinite(a).all()
    m = max(float(np.abs(qkv).max()), float(np.abs(qkvdot).max()), 4.0)   # dy, dydot: N(0, 1) draws
    N = c["H"] * c["W"]
    p_max = 2 * c["d"] * m * m / math.sqrt(c["d"])
    err = 16 * EPS64 * big ** 2 / math.sqrt(c["d"]) * (1 + p_max) * c["d"] * N * m ** 3
    names = ["y", "ydot"]
    for name, a, b in zip(names, out[big][:2], out[0.0][:2]):
        assert_close(a, b, name=f"{name} with shifted scores", rtol=0, atol=err / max(float(np.abs(b).max()), 1e-300))
    for name, ga, gb in zip(["dqkv", "dqkvdot"], out[big][2:], out[0.0][2:]):
        for part, a, b in zip("qkv", ga, gb):
            if part in "qk":
                a, b = a[:, :, 1:], b[:, :, 1:]
            assert np.isfinite(a).all()
            assert_close(a, b, name=f"{name} ({part}) with shifted scores", rtol=0,
                         atol=err / max(float(np.abs(b).max()), 1e-300))


def test_spatial_attention_jvp_float32():
    """float32 in, float32 out, within float32's tolerance of the float64 pair."""
    rng = np.random.default_rng(3)
    qkv, qkvdot = rng.standard_normal((2, 2, 12, 3, 2))
    dy, dydot = rng.standard_normal((2, 2, 4, 3, 2))
    res = {}
    for dt in (np.float64, np.float32):
        y, ydot, cache = T.spatial_attention_jvp_forward(qkv.astype(dt), qkvdot.astype(dt), 2)
        res[dt] = (y, ydot) + T.spatial_attention_jvp_backward(dy.astype(dt), dydot.astype(dt), cache)
    for a, b in zip(res[np.float32], res[np.float64]):
        assert a.dtype == np.float32
        assert_close(a, b, name="float32 vs float64", **TOL[F32])


# --- TangentOps: a Dual runs the tangent pair, a plain array the primal ---------------------------------
@pytest.mark.parametrize("op, args", [
    ("upsample_nearest2x", lambda: ()),
    ("dropout", lambda: (0.4, np.random.default_rng(5))),
    ("spatial_attention", lambda: (2,)),
])
def test_tangent_ops_run_the_new_pairs(op, args):
    rng = np.random.default_rng(0)
    x, xdot = rng.standard_normal((2, 2, 6, 2, 3))
    ops = TangentOps(REFERENCE)
    y, cache = getattr(ops, op + "_forward")(Dual(x, xdot), *args())
    y_ref, ydot_ref, cache_ref = getattr(T, op + "_jvp_forward")(x, xdot, *args())
    np.testing.assert_array_equal(y.x, y_ref)
    np.testing.assert_array_equal(y.dot, ydot_ref)
    dy, dydot = rng.standard_normal((2,) + y.shape)
    dx = getattr(ops, op + "_backward")(Dual(dy, dydot), cache)
    dx_ref, dxdot_ref = getattr(T, op + "_jvp_backward")(dy, dydot, cache_ref)
    np.testing.assert_array_equal(dx.x, dx_ref)
    np.testing.assert_array_equal(dx.dot, dxdot_ref)
    y_plain, c_plain = getattr(ops, op + "_forward")(x, *args())          # no Dual: the primal pair
    np.testing.assert_array_equal(y_plain, getattr(F, op + "_forward")(x, *args())[0])
    np.testing.assert_array_equal(getattr(ops, op + "_backward")(dy, c_plain),
                                  getattr(F, op + "_backward")(dy, getattr(F, op + "_forward")(x, *args())[1]))


@pytest.mark.parametrize("op, args", [
    ("upsample_nearest2x", ()),
    ("dropout", (0.5, np.random.default_rng(0))),
    ("spatial_attention", (1,)),
])
def test_new_tangents_bad_input(op, args):
    with pytest.raises(ValueError, match="tangent xdot must have the shape"):
        getattr(T, op + "_jvp_forward")(np.zeros((1, 6, 2, 2)), np.zeros((1, 3, 2, 2)), *args)


def test_spatial_attention_jvp_bad_heads():
    with pytest.raises(ValueError, match="heads=4 must divide the C=2"):
        T.spatial_attention_jvp_forward(np.zeros((1, 6, 2, 2)), np.zeros((1, 6, 2, 2)), 4)
