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
dx = dy f'(x) + dydot f''(x) xdot; group norm is the long one (see group_norm_jvp_backward).

Each pair is tested against finite differences of its forward (tests/test_tangent.py).
These functions compose the reference (NumPy) primal pairs of refdiff.nn.functional; a
backend may carry its own `<op>_jvp_*` under the same names (`tangent_ops` picks them up).

Shape glossary: B batch, C channels, H, W spatial, D features.
"""
from __future__ import annotations

import types

import numpy as np

from . import functional as F

__all__ = [
    "linear_jvp_forward", "linear_jvp_backward",
    "silu_jvp_forward", "silu_jvp_backward",
    "add_channel_bias_jvp_forward", "add_channel_bias_jvp_backward",
    "concat_jvp_forward", "concat_jvp_backward",
    "conv2d_jvp_forward", "conv2d_jvp_backward",
    "conv_transpose2d_jvp_forward", "conv_transpose2d_jvp_backward",
    "group_norm_jvp_forward", "group_norm_jvp_backward",
    "group_norm_silu_jvp_forward", "group_norm_silu_jvp_backward",
    "tangent_ops",
]


def _check_tangent(op, x, xdot):
    if tuple(xdot.shape) != tuple(x.shape):
        raise ValueError(f"{op}: the tangent xdot must have the shape of x {tuple(x.shape)}; "
                         f"got {tuple(xdot.shape)}")


# --- ops linear in x: the tangent is the op itself, without the bias ---------------------------
def linear_jvp_forward(x, xdot, w, b):
    """y = x w^T + b, ydot = xdot w^T.  x, xdot (B, Din), w (Dout, Din), b (Dout,) or None."""
    _check_tangent("linear", x, xdot)
    y, c = F.linear_forward(x, w, b)
    ydot, cdot = F.linear_forward(xdot, w, None)
    return y, ydot, (c, cdot)


def linear_jvp_backward(dy, dydot, cache):
    """-> dx (B, Din), dxdot (B, Din), dw = dy^T x + dydot^T xdot, db = sum dy (or None)."""
    c, cdot = cache
    dx, dw, db = F.linear_backward(dy, c)
    dxdot, dw_dot, _ = F.linear_backward(dydot, cdot)
    return dx, dxdot, dw + dw_dot, db


def conv2d_jvp_forward(x, xdot, w, b, stride=1, padding=0):
    """y = conv2d(x, w, b), ydot = conv2d(xdot, w, None). x, xdot (B, Cin, H, W)."""
    _check_tangent("conv2d", x, xdot)
    y, c = F.conv2d_forward(x, w, b, stride, padding)
    ydot, cdot = F.conv2d_forward(xdot, w, None, stride, padding)
    return y, ydot, (c, cdot)


def conv2d_jvp_backward(dy, dydot, cache):
    """-> dx, dxdot (B, Cin, H, W), dw (Cout, Cin, kH, kW), db (Cout,) or None."""
    c, cdot = cache
    dx, dw, db = F.conv2d_backward(dy, c)
    dxdot, dw_dot, _ = F.conv2d_backward(dydot, cdot)
    return dx, dxdot, dw + dw_dot, db


def conv_transpose2d_jvp_forward(x, xdot, w, b, stride=1, padding=0):
    """y = conv_transpose2d(x, w, b), ydot = conv_transpose2d(xdot, w, None)."""
    _check_tangent("conv_transpose2d", x, xdot)
    y, c = F.conv_transpose2d_forward(x, w, b, stride, padding)
    ydot, cdot = F.conv_transpose2d_forward(xdot, w, None, stride, padding)
    return y, ydot, (c, cdot)


def conv_transpose2d_jvp_backward(dy, dydot, cache):
    """-> dx, dxdot (B, Cin, H, W), dw (Cin, Cout, kH, kW), db (Cout,) or None."""
    c, cdot = cache
    dx, dw, db = F.conv_transpose2d_backward(dy, c)
    dxdot, dw_dot, _ = F.conv_transpose2d_backward(dydot, cdot)
    return dx, dxdot, dw + dw_dot, db


# --- SiLU: the tangent's adjoint needs the second derivative ------------------------------------
def silu_jvp_forward(x, xdot):
    """y = x s(x), ydot = f'(x) xdot with f' = s (1 + x (1 - s)), s the logistic sigmoid."""
    _check_tangent("silu", x, xdot)
    y, c = F.silu_forward(x)
    ydot = F.silu_backward(xdot, c)            # f'(x) xdot: silu_backward multiplies by f'(x)
    return y, ydot, (x, xdot, c)


def silu_jvp_backward(dy, dydot, cache):
    """dx = dy f'(x) + dydot f''(x) xdot,  dxdot = dydot f'(x),

    with f'' = s (1 - s) (2 + x (1 - 2 s)) (differentiate f' = s + x s (1 - s), s' = s (1 - s)).
    """
    x, xdot, c = cache
    s = c[1]
    f2 = s * (1 - s) * (2 + x * (1 - 2 * s))
    dx = F.silu_backward(dy, c) + dydot * f2 * xdot
    dxdot = F.silu_backward(dydot, c)
    return dx, dxdot


# --- shape ops and the time-embedding add --------------------------------------------------------
def add_channel_bias_jvp_forward(x, xdot, v):
    """y = x + v[:, :, None, ...], ydot = xdot: v (B, C), the time embedding, does not depend
    on x, so it has no tangent. x, xdot (B, C, ...)."""
    _check_tangent("add_channel_bias", x, xdot)
    y, c = F.add_channel_bias_forward(x, v)
    return y, xdot, c


def add_channel_bias_jvp_backward(dy, dydot, cache):
    """-> dx = dy, dxdot = dydot, dv (B, C) = dy summed over space."""
    dx, dv = F.add_channel_bias_backward(dy, cache)
    return dx, dydot, dv


def concat_jvp_forward(xs, xdots, axis=1):
    """Concatenate the primals and, in the same layout, the tangents."""
    if len(xs) != len(xdots):
        raise ValueError(f"concat: {len(xs)} inputs but {len(xdots)} tangents")
    for x, xdot in zip(xs, xdots):
        _check_tangent("concat", x, xdot)
    y, c = F.concat_forward(xs, axis)
    ydot, _ = F.concat_forward(xdots, axis)
    return y, ydot, c


def concat_jvp_backward(dy, dydot, cache):
    """-> (list of dx, list of dxdot), one per input."""
    return F.concat_backward(dy, cache), F.concat_backward(dydot, cache)


# --- group norm ----------------------------------------------------------------------------------
def group_norm_jvp_forward(x, xdot, num_groups, gamma, beta, eps=1e-5):
    """y = gamma xhat + beta (refdiff.nn.norm), ydot = gamma xhat_dot, per (sample, group):

        xhat_dot = r (xdot - mean(xdot) - xhat mean(xhat xdot)),   r = 1/sqrt(var + eps)

    (d xhat / dx = r (I - 1 1^T/n - xhat xhat^T/n), the matrix group_norm_backward applies).
    """
    _check_tangent("group_norm", x, xdot)
    y, c = F.group_norm_forward(x, num_groups, gamma, beta, eps)
    xhat, rstd, g = c                                          # g: gamma shaped to broadcast
    B = x.shape[0]
    xh = xhat.reshape(B, num_groups, -1)                       # (B, G, n)
    ud = xdot.astype(x.dtype, copy=False).reshape(B, num_groups, -1)
    u = rstd * (ud - ud.mean(axis=2, keepdims=True) - xh * (xh * ud).mean(axis=2, keepdims=True))
    u = u.reshape(x.shape)                                     # xhat_dot
    return y, u * g, (c, ud, u)


def group_norm_jvp_backward(dy, dydot, cache):
    """-> dx, dxdot (like x), dgamma (C,), dbeta (C,).

    Per (sample, group), with n entries, e = gamma dydot (the gradient reaching xhat_dot = u),
    a = mean(xdot), c = mean(xhat xdot), so that u = r (xdot - a - xhat c):

      dxdot = r (e - mean(e) - xhat mean(xhat e))                   (the same symmetric map)
      d/dxhat  of <e, u>:  -r (c e + mean(e xhat) xdot)
      d/dr     of <e, u>:  sum(e u) / r
      dx = r (G - mean(G) - xhat mean(G xhat) - xhat mean(e u)),   G = gamma dy + d/dxhat,

    the last line being group_norm_backward's formula for an upstream G on xhat plus the
    path through r = (mean(xc^2) + eps)^(-1/2), whose gradient is d r/d x = -r^2 xhat / n.
    dgamma = sum(dy xhat + dydot u), dbeta = sum(dy), over batch and space.
    """
    (xhat, rstd, g), ud, u = cache
    B, C = xhat.shape[:2]
    G = rstd.shape[1]
    axes = (0,) + tuple(range(2, xhat.ndim))
    dy = np.asarray(dy, dtype=xhat.dtype)
    dydot = np.asarray(dydot, dtype=xhat.dtype)
    dgamma = (dy * xhat + dydot * u).sum(axis=axes)
    dbeta = dy.sum(axis=axes)
    mean = lambda a: a.mean(axis=2, keepdims=True)
    xh, ug = xhat.reshape(B, G, -1), u.reshape(B, G, -1)
    e = (dydot * g).reshape(B, G, -1)
    dxdot = rstd * (e - mean(e) - xh * mean(xh * e))
    Gx = (dy * g).reshape(B, G, -1) - rstd * (mean(xh * ud) * e + mean(e * xh) * ud)
    dx = rstd * (Gx - mean(Gx) - xh * mean(Gx * xh) - xh * mean(e * ug))
    return dx.reshape(xhat.shape), dxdot.reshape(xhat.shape), dgamma, dbeta


def group_norm_silu_jvp_forward(x, xdot, num_groups, gamma, beta, eps=1e-5):
    """SiLU(GroupNorm(x)) and its tangent, composed from the two pairs above."""
    z, zdot, norm_cache = group_norm_jvp_forward(x, xdot, num_groups, gamma, beta, eps)
    y, ydot, act_cache = silu_jvp_forward(z, zdot)
    return y, ydot, (norm_cache, act_cache)


def group_norm_silu_jvp_backward(dy, dydot, cache):
    """-> dx, dxdot, dgamma, dbeta."""
    norm_cache, act_cache = cache
    dz, dzdot = silu_jvp_backward(dy, dydot, act_cache)
    return group_norm_jvp_backward(dz, dzdot, norm_cache)


# --- backends -------------------------------------------------------------------------------------
_NAMES = [n for n in __all__ if n != "tangent_ops"]


def tangent_ops(ops):
    """The tangent pairs a model with backend `ops` uses: the backend's own `<op>_jvp_*`
    where it carries them, these reference pairs otherwise (no branching on a backend name)."""
    here = globals()
    return types.SimpleNamespace(**{n: getattr(ops, n, here[n]) for n in _NAMES})
