"""Tangent (forward-mode) op pairs and their adjoints, for exact sliced score matching (reference).

Sliced score matching needs the directional derivative of the network along a probe nu,
J nu = d/dh f(x + h nu)|_{h=0}, and then the gradient of a loss that depends on both f(x)
and J nu with respect to the parameters (report ch. 4; Song et al. 2019). Both are done by
hand, op by op:

    <op>_jvp_forward(x, xdot, params...) -> (y, ydot, cache)
        y = f(x; theta),  ydot = (df/dx)(x; theta) xdot            (forward mode)
    <op>_jvp_backward(dy, dydot, cache) -> (dx, dxdot, dparams...)
        the gradient of the scalar  S = <y, dy> + <ydot, dydot>  with respect to
        x, xdot and each parameter                                  (reverse mode through
                                                                     the primal AND the tangent)

Parameters carry no tangent (nu perturbs x only). For an op linear in x (linear, conv2d,
conv_transpose2d) ydot = f(xdot; theta) without the bias, so both halves reuse the primal
pair: dx = f^T dy, dxdot = f^T dydot, dW = dW(dy, x) + dW(dydot, xdot). For a nonlinear
op the tangent's gradient with respect to x brings in the second derivative: silu gives
dx = dy f'(x) + dydot f''(x) xdot; group norm (group_norm_jvp_backward) and softmax attention
(spatial_attention_jvp_backward) are the long ones. Upsampling and dropout are linear in x
too (no parameters): dropout's tangent is the same draw of the mask applied to xdot.

Each pair is tested against finite differences of its forward (tests/test_tangent.py,
tests/test_tangent_attention.py).
The pairs are built on a backend's primal pairs, passed as the keyword `ops` (the NumPy
reference by default): `tangent_ops(model.ops)` binds them to a model's backend, so the
linear and conv tangents run that backend's kernels, and the extra elementwise terms use
only array methods and `ops.xp`. They never read a primal cache (backends lay theirs out
differently): what they need beyond it (sigmoid, the normalised input) they recompute. A
backend may also carry its own fused `<op>_jvp_*` under these names; `tangent_ops` then
uses those.

Shape glossary: B batch, C channels, H, W spatial, D features.
"""
from __future__ import annotations

import functools
import math
import types

from ..backend import REFERENCE

__all__ = [
    "linear_jvp_forward", "linear_jvp_backward",
    "silu_jvp_forward", "silu_jvp_backward",
    "add_channel_bias_jvp_forward", "add_channel_bias_jvp_backward",
    "concat_jvp_forward", "concat_jvp_backward",
    "conv2d_jvp_forward", "conv2d_jvp_backward",
    "conv_transpose2d_jvp_forward", "conv_transpose2d_jvp_backward",
    "group_norm_jvp_forward", "group_norm_jvp_backward",
    "group_norm_silu_jvp_forward", "group_norm_silu_jvp_backward",
    "upsample_nearest2x_jvp_forward", "upsample_nearest2x_jvp_backward",
    "dropout_jvp_forward", "dropout_jvp_backward",
    "spatial_attention_jvp_forward", "spatial_attention_jvp_backward",
    "tangent_ops",
]


def _check_tangent(op, x, xdot):
    if tuple(xdot.shape) != tuple(x.shape):
        raise ValueError(f"{op}: the tangent xdot must have the shape of x {tuple(x.shape)}; "
                         f"got {tuple(xdot.shape)}")


# --- ops linear in x: the tangent is the op itself, without the bias ---------------------------
def _linear_in_x_forward(forward, x, xdot, w, b, *hyper):
    """Tangent of an op linear in x (linear, conv2d, conv_transpose2d): the tangent is the
    same op applied to xdot without the bias."""
    y, c = forward(x, w, b, *hyper)
    ydot, cdot = forward(xdot, w, None, *hyper)
    return y, ydot, (c, cdot)


def _linear_in_x_backward(backward, dy, dydot, cache):
    """Adjoint of (x, xdot) -> (op(x, w, b), op(xdot, w)): two ordinary backward passes;
    w receives both weight gradients, b only the primal's."""
    c, cdot = cache
    dx, dw, db = backward(dy, c)
    dxdot, dw_dot, _ = backward(dydot, cdot)
    return dx, dxdot, dw + dw_dot, db


def linear_jvp_forward(x, xdot, w, b, *, ops=REFERENCE):
    """y = x w^T + b, ydot = xdot w^T.  x, xdot (B, Din), w (Dout, Din), b (Dout,) or None."""
    _check_tangent("linear", x, xdot)
    return _linear_in_x_forward(ops.linear_forward, x, xdot, w, b)


def linear_jvp_backward(dy, dydot, cache, *, ops=REFERENCE):
    """-> dx (B, Din), dxdot (B, Din), dw = dy^T x + dydot^T xdot, db = sum dy (or None)."""
    return _linear_in_x_backward(ops.linear_backward, dy, dydot, cache)


def conv2d_jvp_forward(x, xdot, w, b, stride=1, padding=0, *, ops=REFERENCE):
    """y = conv2d(x, w, b), ydot = conv2d(xdot, w, None). x, xdot (B, Cin, H, W)."""
    _check_tangent("conv2d", x, xdot)
    return _linear_in_x_forward(ops.conv2d_forward, x, xdot, w, b, stride, padding)


def conv2d_jvp_backward(dy, dydot, cache, *, ops=REFERENCE):
    """-> dx, dxdot (B, Cin, H, W), dw (Cout, Cin, kH, kW), db (Cout,) or None."""
    return _linear_in_x_backward(ops.conv2d_backward, dy, dydot, cache)


def conv_transpose2d_jvp_forward(x, xdot, w, b, stride=1, padding=0, *, ops=REFERENCE):
    """y = conv_transpose2d(x, w, b), ydot = conv_transpose2d(xdot, w, None)."""
    _check_tangent("conv_transpose2d", x, xdot)
    return _linear_in_x_forward(ops.conv_transpose2d_forward, x, xdot, w, b, stride, padding)


def conv_transpose2d_jvp_backward(dy, dydot, cache, *, ops=REFERENCE):
    """-> dx, dxdot (B, Cin, H, W), dw (Cin, Cout, kH, kW), db (Cout,) or None."""
    return _linear_in_x_backward(ops.conv_transpose2d_backward, dy, dydot, cache)


# --- SiLU: the tangent's adjoint needs the second derivative ------------------------------------
def silu_jvp_forward(x, xdot, *, ops=REFERENCE):
    """y = x s(x), ydot = f'(x) xdot with f' = s (1 + x (1 - s)), s the logistic sigmoid."""
    _check_tangent("silu", x, xdot)
    y, c = ops.silu_forward(x)
    ydot = ops.silu_backward(xdot, c)          # f'(x) xdot: silu_backward multiplies by f'(x)
    return y, ydot, (x, xdot, c)


def silu_jvp_backward(dy, dydot, cache, *, ops=REFERENCE):
    """dx = dy f'(x) + dydot f''(x) xdot,  dxdot = dydot f'(x),

    with f'' = s (1 - s) (2 + x (1 - 2 s)) (differentiate f' = s + x s (1 - s), s' = s (1 - s)).
    """
    x, xdot, c = cache
    half = x.dtype.type(0.5)
    s = half * (1 + ops.xp.tanh(half * x))     # sigmoid, as the reference computes it
    f2 = s * (1 - s) * (2 + x * (1 - 2 * s))
    dx = ops.silu_backward(dy, c) + dydot * f2 * xdot
    dxdot = ops.silu_backward(dydot, c)
    return dx, dxdot


# --- shape ops and the time-embedding add --------------------------------------------------------
def add_channel_bias_jvp_forward(x, xdot, v, *, ops=REFERENCE):
    """y = x + v[:, :, None, ...], ydot = xdot: v (B, C), the time embedding, does not depend
    on x, so it has no tangent. x, xdot (B, C, ...)."""
    _check_tangent("add_channel_bias", x, xdot)
    y, c = ops.add_channel_bias_forward(x, v)
    return y, xdot, c


def add_channel_bias_jvp_backward(dy, dydot, cache, *, ops=REFERENCE):
    """-> dx = dy, dxdot = dydot, dv (B, C) = dy summed over space."""
    dx, dv = ops.add_channel_bias_backward(dy, cache)
    return dx, dydot, dv


def concat_jvp_forward(xs, xdots, axis=1, *, ops=REFERENCE):
    """Concatenate the primals and, in the same layout, the tangents."""
    if len(xs) != len(xdots):
        raise ValueError(f"concat: {len(xs)} inputs but {len(xdots)} tangents")
    for x, xdot in zip(xs, xdots):
        _check_tangent("concat", x, xdot)
    y, c = ops.concat_forward(xs, axis)
    ydot, cdot = ops.concat_forward(xdots, axis)
    return y, ydot, (c, cdot)


def concat_jvp_backward(dy, dydot, cache, *, ops=REFERENCE):
    """-> (list of dx, list of dxdot), one per input."""
    c, cdot = cache
    return ops.concat_backward(dy, c), ops.concat_backward(dydot, cdot)


# --- group norm ----------------------------------------------------------------------------------
def _mean(a):
    return a.mean(axis=2, keepdims=True)


def group_norm_jvp_forward(x, xdot, num_groups, gamma, beta, eps=1e-5, *, ops=REFERENCE):
    """y = gamma xhat + beta (the backend's group_norm), ydot = gamma xhat_dot, per (sample, group):

        xhat_dot = r (xdot - mean(xdot) - xhat mean(xhat xdot)),   r = 1/sqrt(var + eps)

    (d xhat / dx = r (I - 1 1^T/n - xhat xhat^T/n), the matrix group_norm_backward applies).
    xhat and r are recomputed here (two-pass, as refdiff.nn.norm) rather than read from the
    backend's cache.
    """
    _check_tangent("group_norm", x, xdot)
    y, c = ops.group_norm_forward(x, num_groups, gamma, beta, eps)
    B, C = x.shape[:2]
    g = gamma.astype(x.dtype, copy=False).reshape((1, C) + (1,) * (x.ndim - 2))
    xg = x.reshape(B, num_groups, -1)                                   # (B, G, n)
    xc = xg - _mean(xg)
    rstd = 1 / ops.xp.sqrt(_mean(xc * xc) + x.dtype.type(eps))         # (B, G, 1)
    xh = xc * rstd
    ud = xdot.astype(x.dtype, copy=False).reshape(xg.shape)
    u = rstd * (ud - _mean(ud) - xh * _mean(xh * ud))                   # xhat_dot (B, G, n)
    return y, u.reshape(x.shape) * g, (c, xh, rstd, ud, u, g)


def group_norm_jvp_backward(dy, dydot, cache, *, ops=REFERENCE):
    """-> dx, dxdot (like x), dgamma (C,), dbeta (C,).

    Per (sample, group), with n entries, e = gamma dydot (the gradient reaching xhat_dot = u),
    a = mean(xdot), c = mean(xhat xdot), so that u = r (xdot - a - xhat c):

      dxdot = r (e - mean(e) - xhat mean(xhat e))                   (the same symmetric map)
      d/dxhat  of <e, u>:  T1 = -r (c e + mean(e xhat) xdot)
      d/dr     of <e, u>:  sum(e u) / r
      dx = [group_norm_backward's dx for dy]
           + r (T1 - mean(T1) - xhat mean(T1 xhat)) - r xhat mean(e u),

    the middle term being group_norm_backward's map applied to an upstream T1 on xhat, the
    last the path through r = (mean(xc^2) + eps)^(-1/2), whose gradient is -r^2 xhat / n.
    dgamma = sum(dy xhat + dydot u), dbeta = sum(dy), over batch and space.
    """
    c, xh, rstd, ud, u, g = cache
    shape, dtype = dydot.shape, xh.dtype
    dydot = dydot.astype(dtype, copy=False)
    dx, dgamma, dbeta = ops.group_norm_backward(dy, c)                  # the primal path
    axes = (0,) + tuple(range(2, dydot.ndim))
    dgamma = dgamma + (dydot * u.reshape(shape)).sum(axis=axes)
    e = (dydot * g).reshape(xh.shape)
    dxdot = rstd * (e - _mean(e) - xh * _mean(xh * e))
    T1 = -rstd * (_mean(xh * ud) * e + _mean(e * xh) * ud)
    dx_t = rstd * (T1 - _mean(T1) - xh * _mean(T1 * xh) - xh * _mean(e * u))
    return dx + dx_t.reshape(shape), dxdot.reshape(shape), dgamma, dbeta


def group_norm_silu_jvp_forward(x, xdot, num_groups, gamma, beta, eps=1e-5, *, ops=REFERENCE):
    """SiLU(GroupNorm(x)) and its tangent, composed from the two pairs above."""
    z, zdot, norm_cache = group_norm_jvp_forward(x, xdot, num_groups, gamma, beta, eps, ops=ops)
    y, ydot, act_cache = silu_jvp_forward(z, zdot, ops=ops)
    return y, ydot, (norm_cache, act_cache)


def group_norm_silu_jvp_backward(dy, dydot, cache, *, ops=REFERENCE):
    """-> dx, dxdot, dgamma, dbeta."""
    norm_cache, act_cache = cache
    dz, dzdot = silu_jvp_backward(dy, dydot, act_cache, ops=ops)
    return group_norm_jvp_backward(dz, dzdot, norm_cache, ops=ops)


# --- the modern UNet's ops (refdiff.nn.attention) -------------------------------------------------
def upsample_nearest2x_jvp_forward(x, xdot, *, ops=REFERENCE):
    """y = up(x), ydot = up(xdot): linear, no parameters. x, xdot (B, C, H, W) -> (B, C, 2H, 2W)."""
    _check_tangent("upsample_nearest2x", x, xdot)
    y, c = ops.upsample_nearest2x_forward(x)
    ydot, cdot = ops.upsample_nearest2x_forward(xdot)
    return y, ydot, (c, cdot)


def upsample_nearest2x_jvp_backward(dy, dydot, cache, *, ops=REFERENCE):
    """-> dx = up^T dy, dxdot = up^T dydot (each 2 x 2 block summed)."""
    c, cdot = cache
    return ops.upsample_nearest2x_backward(dy, c), ops.upsample_nearest2x_backward(dydot, cdot)


def dropout_jvp_forward(x, xdot, p, rng, *, ops=REFERENCE):
    """y = x m / (1 - p), ydot = xdot m / (1 - p), with ONE draw of the mask m from rng: the
    tangent is the derivative of this very draw. The mask is diagonal, so the backend's
    dropout_backward (its argument times the scaled mask) applies it to xdot. p = 0: y = x,
    ydot = xdot, nothing drawn."""
    _check_tangent("dropout", x, xdot)
    y, c = ops.dropout_forward(x, p, rng)
    return y, ops.dropout_backward(xdot, c), c


def dropout_jvp_backward(dy, dydot, cache, *, ops=REFERENCE):
    """-> dx = dy m / (1 - p), dxdot = dydot m / (1 - p), with the forward's mask."""
    return ops.dropout_backward(dy, cache), ops.dropout_backward(dydot, cache)


def _tr(a):
    return a.transpose(0, 1, 3, 2)


def _rowsum(a):
    return a.sum(axis=-1, keepdims=True)


def _qkv_heads(a, heads):
    """(B, 3C, H, W) -> q, k, v, each (B, heads, d, N): the layout of refdiff.nn.attention."""
    B, C3, H, W = a.shape
    parts = a.reshape(B, 3, heads, C3 // 3 // heads, H * W)
    return parts[:, 0], parts[:, 1], parts[:, 2]


def spatial_attention_jvp_forward(qkv, qkvdot, heads=1, *, ops=REFERENCE):
    """y = attention(qkv) (the backend's pair) and its tangent along qkvdot. Per head, in
    refdiff.nn.attention's notation (q, k, v (d, N); S = q^T k / sqrt(d); A = softmax of
    each row of S; y = v A^T):

        Sdot = (qdot^T k + q^T kdot) / sqrt(d)                         (N, N)
        Adot = A * P,   P = Sdot - rowsum(A * Sdot)      (softmax's Jacobian, row by row)
        ydot = vdot A^T + v Adot^T                                      (d, N)

    A is recomputed here (max-shifted, so finite for any finite qkv) rather than read from
    the backend's cache. qkv, qkvdot (B, 3C, H, W) -> y, ydot (B, C, H, W).
    """
    _check_tangent("spatial_attention", qkv, qkvdot)
    y, c = ops.spatial_attention_forward(qkv, heads)       # checks heads and the shape
    q, k, v = _qkv_heads(qkv, heads)
    qd, kd, vd = _qkv_heads(qkvdot.astype(qkv.dtype, copy=False), heads)
    scale = qkv.dtype.type(1.0 / math.sqrt(q.shape[2]))
    S = (_tr(q) @ k) * scale                                           # (B, heads, N, N)
    e = ops.xp.exp(S - S.max(axis=-1, keepdims=True))
    A = e / _rowsum(e)
    Sdot = (_tr(qd) @ k + _tr(q) @ kd) * scale
    P = Sdot - _rowsum(A * Sdot)
    Adot = A * P
    ydot = vd @ _tr(A) + v @ _tr(Adot)                                 # (B, heads, d, N)
    return y, ydot.reshape(y.shape), (c, q, k, v, qd, kd, vd, A, Sdot, P, Adot, scale, qkv.shape)


def spatial_attention_jvp_backward(dy, dydot, cache, *, ops=REFERENCE):
    """-> dqkv, dqkvdot (B, 3C, H, W): the gradient of <y, dy> + <ydot, dydot>.

    ydot is linear in qkvdot with the primal's Jacobian, so dqkvdot is the primal backward of
    dydot; dqkv is the primal backward of dy plus the tangent's second-order terms (the "+="
    lines below). Per head, with s = 1 / sqrt(d), E = dydot (d, N) and
    J(X) = A * (X - rowsum(A * X)) the softmax's Jacobian (symmetric, applied row by row):

        G  = E^T v                    the gradient reaching Adot          (N, N)
        Gs = J(G)                     ... and, through Adot = J(Sdot), reaching Sdot
        dA = E^T vdot + G * P - rowsum(G * A) * Sdot
                                      reaching A: from vdot A^T, and from A * P with
                                      P = Sdot - r, r[n] = sum_m A[n, m] Sdot[n, m]
        dv    += E Adot
        dq    += s (k J(dA)^T + kdot Gs^T)        (S = s q^T k,  Sdot = s (qdot^T k + q^T kdot))
        dk    += s (q J(dA) + qdot Gs)
        dqdot  = s k Gs^T,   dkdot = s q Gs,   dvdot = E A

    (d/dA[n, m] of sum G * A * P = G[n, m] P[n, m] - Sdot[n, m] sum_m' G[n, m'] A[n, m'].)
    """
    c, q, k, v, qd, kd, vd, A, Sdot, P, Adot, scale, shape = cache
    E = dydot.astype(q.dtype, copy=False).reshape(v.shape)              # (B, heads, d, N)
    G = _tr(E) @ v
    Gs = A * (G - _rowsum(G * A))
    dA = _tr(E) @ vd + G * P - _rowsum(G * A) * Sdot
    dS = A * (dA - _rowsum(dA * A))
    dq = (k @ _tr(dS) + kd @ _tr(Gs)) * scale
    dk = (q @ dS + qd @ Gs) * scale
    dv = E @ Adot
    second = ops.xp.stack([dq, dk, dv], axis=1).reshape(shape)
    return ops.spatial_attention_backward(dy, c) + second, ops.spatial_attention_backward(dydot, c)


# --- backends -------------------------------------------------------------------------------------
_NAMES = [n for n in __all__ if n != "tangent_ops"]
_BOUND = {}


def tangent_ops(ops):
    """The tangent pairs for a model on backend `ops`: the backend's own `<op>_jvp_*` where it
    carries them, else the pairs above bound to its primal pairs (no branching on a name)."""
    key = id(ops)
    if key not in _BOUND or _BOUND[key][0] is not ops:
        here = globals()
        _BOUND[key] = (ops, types.SimpleNamespace(**{
            n: getattr(ops, n) if hasattr(ops, n) else functools.partial(here[n], ops=ops) for n in _NAMES}))
    return _BOUND[key][1]
