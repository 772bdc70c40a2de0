"""Forward mode for the UNet: `forward_jvp` / `backward_jvp`, inherited by refdiff.nn.unet.UNet
(reference). Like the MLP (refdiff/nn/mlp.py), the model class itself carries its JVP.

`forward_jvp(x, t, v)` returns eps_theta(x, t) and its directional derivative
(d eps_theta / dx) v; `backward_jvp(deps, deps_dot)` returns the gradient of
<eps, deps> + <eps_dot, deps_dot> with respect to x and accumulates the parameter gradients,
through the primal and the tangent pass. Sliced score matching needs exactly that
(refdiff.losses.ssm; report ch. 4).

How: forward mode is the forward pass on dual numbers. UNet.forward itself runs, unchanged,
on Dual(x, v) (a primal array and its tangent), with the model's ops replaced by
TangentOps: every op given a Dual runs its tangent pair from refdiff.nn.tangent,

    conv2d_forward(Dual(h, hd), w, b, s, p)  ->  conv2d_jvp_forward(h, hd, w, b, s, p)

and likewise conv_transpose2d, silu, group_norm, add_channel_bias, concat, upsample_nearest2x,
dropout (one draw of the mask for the primal and the tangent) and spatial_attention; an op given a
plain array runs the primal pair (the time MLPs: they do not depend on x, their tangent is
zero). UNet.backward then walks that tape with Dual cotangents (dy, dydot), each op's
backward being the tangent pair's backward, and the parameter gradients of both passes
accumulate. So the network's structure is written once, in unet.py; this module holds only
the change of number system. The skip term c(t) x is linear: Dual arithmetic gives
c(t) (x, v) (Dual.__add__ / __mul__).
"""
from __future__ import annotations

from functools import partialmethod

from .tangent import tangent_ops


class Dual:
    """(x, dot): an array of the forward pass and its tangent, same shape and dtype."""
    __array_ufunc__ = None          # ndarray * Dual defers to Dual.__rmul__

    def __init__(self, x, dot):
        self.x, self.dot = x, dot

    shape = property(lambda self: self.x.shape)
    ndim = property(lambda self: self.x.ndim)
    dtype = property(lambda self: self.x.dtype)

    def astype(self, dtype, copy=True):
        return Dual(self.x.astype(dtype, copy=copy), self.dot.astype(dtype, copy=copy))

    def __add__(self, other):       # a plain array is a constant: no tangent
        if isinstance(other, Dual):
            return Dual(self.x + other.x, self.dot + other.dot)
        return Dual(self.x + other, self.dot)

    __radd__ = __add__

    def __mul__(self, c):           # c: a constant (no tangent), e.g. the skip coefficient
        if isinstance(c, Dual):
            raise TypeError("Dual * Dual: the UNet's forward multiplies only by constants")
        return Dual(self.x * c, self.dot * c)

    def __rmul__(self, c):
        if isinstance(c, Dual):
            raise TypeError("Dual * Dual: the UNet's forward multiplies only by constants")
        return Dual(c * self.x, c * self.dot)


class _DualArrayModule:
    """The array module as the forward sees it: Duals pass through asarray; isfinite looks at
    the primal (forward_jvp checks the direction itself); the rest is the backend's."""

    def __init__(self, xp):
        self._xp = xp

    def __getattr__(self, name):
        return getattr(self._xp, name)

    def asarray(self, a, *args, **kwargs):
        return a if isinstance(a, Dual) else self._xp.asarray(a, *args, **kwargs)

    def isfinite(self, a):
        return self._xp.isfinite(a.x if isinstance(a, Dual) else a)


class TangentOps:
    """A backend's ops for a forward pass on Duals (see the module docstring); every other
    name (time_embedding, asarray, to_numpy, name, ...) is the backend's own."""

    def __init__(self, ops):
        self._ops, self._tangent = ops, tangent_ops(ops)
        self.xp = _DualArrayModule(ops.xp)

    def __getattr__(self, name):
        return getattr(self._ops, name)

    def _forward(self, op, x, *args):
        """`op`'s forward: on a Dual its tangent pair, on a plain array the primal pair (the
        models call their ops with positional arguments only)."""
        if not isinstance(x, Dual):
            return getattr(self._ops, op + "_forward")(x, *args)
        y, ydot, cache = getattr(self._tangent, op + "_jvp_forward")(x.x, x.dot, *args)
        return Dual(y, ydot), cache

    def _backward(self, op, dy, cache):
        """`op`'s backward: on a Dual cotangent the tangent pair's, on a plain array the primal's."""
        if not isinstance(dy, Dual):
            return getattr(self._ops, op + "_backward")(dy, cache)
        dx, dxdot, *grads = getattr(self._tangent, op + "_jvp_backward")(dy.x, dy.dot, cache)
        return (Dual(dx, dxdot), *grads) if grads else Dual(dx, dxdot)

    def concat_forward(self, xs, axis=1):
        if not any(isinstance(a, Dual) for a in xs):
            return self._ops.concat_forward(xs, axis)
        y, ydot, cache = self._tangent.concat_jvp_forward([a.x for a in xs], [a.dot for a in xs], axis)
        return Dual(y, ydot), cache

    def concat_backward(self, dy, cache):
        if not isinstance(dy, Dual):
            return self._ops.concat_backward(dy, cache)
        dxs, dxdots = self._tangent.concat_jvp_backward(dy.x, dy.dot, cache)
        return [Dual(a, b) for a, b in zip(dxs, dxdots)]


# each op's pair: _forward / _backward with the op's name bound (dropout's p and rng pass
# through). The partials wrap the methods themselves, so every call runs them (a mutation
# tool's switch of them included); closures built here would be frozen at import.
_PAIRED_OPS = ("linear", "silu", "add_channel_bias", "group_norm", "group_norm_silu", "conv2d",
               "conv_transpose2d", "upsample_nearest2x", "dropout", "spatial_attention")
for _op in _PAIRED_OPS:
    setattr(TangentOps, _op + "_forward", partialmethod(TangentOps._forward, _op))
    setattr(TangentOps, _op + "_backward", partialmethod(TangentOps._backward, _op))
del _op


class UNetJVP:
    """forward_jvp / backward_jvp of refdiff.nn.unet.UNet: its forward and backward run on
    Duals. The primal tape of a pending forward is left as it was."""

    _STATE = ("_tape", "_out_shape", "_skip")

    def _run_tangent(self, method, args, state, kwargs=None):
        """method(*args, **kwargs) with TangentOps and the given tape state; -> (result, state after)."""
        saved = tuple(getattr(self, k, None) for k in self._STATE) + (self.ops,)
        for k, v in zip(self._STATE, state):
            setattr(self, k, v)
        self.ops = TangentOps(saved[-1])
        try:
            out = method(*args, **(kwargs or {}))
            return out, tuple(getattr(self, k, None) for k in self._STATE)
        finally:
            self.ops = saved[-1]
            for k, v in zip(self._STATE, saved):
                setattr(self, k, v)

    def forward_jvp(self, x, t, v, *args, **kwargs):
        """x, v (B, C, H, W), t (B,) -> (eps_theta (B, C, H, W), (d eps_theta/dx) v (B, C, H, W)).
        Further arguments go to the model's forward as they are (unet-ddpm: labels y, dropout
        rng; the dropout masks are drawn once and serve the primal and the tangent)."""
        xp = self.ops.xp
        x, v = xp.asarray(x), xp.asarray(v)
        if tuple(v.shape) != tuple(x.shape):
            raise ValueError(f"model {self.name!r}: the direction v must have the shape of x {tuple(x.shape)}; "
                             f"got {tuple(v.shape)}")
        if v.ndim and not bool(xp.all(xp.isfinite(v))):
            raise ValueError(f"model {self.name!r}: the direction v contains NaN or Inf")
        y, self._jvp_state = self._run_tangent(self.forward, (Dual(x, v), t, *args), (None, None, None), kwargs)
        return y.x, y.dot

    def backward_jvp(self, deps, deps_dot):
        """Gradient of <eps, deps> + <eps_dot, deps_dot>: returns d/dx (B, C, H, W); the
        parameter gradients accumulate into self.grads."""
        state = getattr(self, "_jvp_state", None)
        if state is None or state[0] is None:
            raise RuntimeError("backward_jvp called before forward_jvp")
        xp = self.ops.xp
        dy, dyd = xp.asarray(deps), xp.asarray(deps_dot)
        for name, a in (("deps", dy), ("deps_dot", dyd)):
            if tuple(a.shape) != state[1]:
                raise ValueError(f"model {self.name!r}: {name} must have the output's shape "
                                 f"{state[1]}; got {tuple(a.shape)}")
        self._jvp_state = None
        dx, _ = self._run_tangent(self.backward, (Dual(dy, dyd),), state)
        return dx.x                  # dx.dot, the gradient with respect to v, is not needed
