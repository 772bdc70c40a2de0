"""Fused op pairs for the networks' inference forward (reference): each is a composition of
the reference pairs of refdiff.nn.functional, and that composition is its definition.

    conv2d_silu          y = SiLU(conv2d(x, w, b, stride, padding))
                         (the convolution's bias and SiLU in its epilogue)
    group_norm_conv2d    y = [SiLU](conv2d([SiLU](GroupNorm(x [+ shift])), w, b, stride, padding))
                         (GroupNorm, and the SiLU after it, in the convolution's input pass)

Shapes: x (B, Cin, H, W), w (Cout, Cin, kH, kW), b (Cout,) or None, gamma, beta (Cin,),
shift (B, Cin) or None: a per-sample, per-channel vector added before the norm, as
add_channel_bias adds the time embedding (unet-seed's stages, unet-ddpm's ResBlocks);
y (B, Cout, Ho, Wo). silu_in applies SiLU between the norm and the convolution, silu_out
after the convolution.

Each pair is written once, as a function of an op namespace `ops` (`*_with(ops, ...)`): the
reference runs it on refdiff.nn.functional, and a backend's version 1 runs the same code on
its own literal ports (refdiff_cuda.numba_cpu.fused), so there is no second copy of the
composition. A backend's faster version (the numba backend's: one kernel for the norm,
the convolution and both SiLUs, refdiff_cuda/numba_cpu/fused.py) must agree with these
pairs (refdiff_cuda.testing.check_op; tests/test_fused_ops.py).

The backward walks the composition in reverse; gradients come in the order of the
forward's array inputs: conv2d_silu -> (dx, dw, db); group_norm_conv2d -> (dx, dgamma,
dbeta, dw, db, dshift) (dshift None without a shift). The models' inference forward
(UNet.predict, UNetDDPM.predict) calls only the forwards and keeps no cache.
"""
from __future__ import annotations

__all__ = ["conv2d_silu_forward", "conv2d_silu_backward", "group_norm_conv2d_forward",
           "group_norm_conv2d_backward", "conv2d_silu_forward_with", "conv2d_silu_backward_with",
           "group_norm_conv2d_forward_with", "group_norm_conv2d_backward_with", "FUSED_PAIRS", "fused_ops"]

# op name -> (forward, backward): the fused pairs, named as refdiff_cuda.PAIRS names the others
FUSED_PAIRS = {"conv2d_silu": ("conv2d_silu_forward", "conv2d_silu_backward"),
               "group_norm_conv2d": ("group_norm_conv2d_forward", "group_norm_conv2d_backward")}


# --- conv2d + bias + SiLU -----------------------------------------------------------------------------
def conv2d_silu_forward_with(ops, x, w, b, stride=1, padding=0):
    h, conv = ops.conv2d_forward(x, w, b, stride, padding)
    y, act = ops.silu_forward(h)
    return y, (conv, act)


def conv2d_silu_backward_with(ops, dy, cache):
    conv, act = cache
    return ops.conv2d_backward(ops.silu_backward(dy, act), conv)


# --- [shift ->] GroupNorm [-> SiLU] -> conv2d [-> SiLU] ------------------------------------------------
def group_norm_conv2d_forward_with(ops, x, num_groups, gamma, beta, w, b, shift=None, stride=1, padding=0,
                                   silu_in=False, silu_out=False, eps=1e-5):
    add = act_in = act_out = None
    if shift is not None:
        x, add = ops.add_channel_bias_forward(x, shift)
    h, norm = ops.group_norm_forward(x, num_groups, gamma, beta, eps)
    if silu_in:
        h, act_in = ops.silu_forward(h)
    h, conv = ops.conv2d_forward(h, w, b, stride, padding)
    if silu_out:
        h, act_out = ops.silu_forward(h)
    return h, (add, norm, act_in, conv, act_out)


def group_norm_conv2d_backward_with(ops, dy, cache):
    add, norm, act_in, conv, act_out = cache
    if act_out is not None:
        dy = ops.silu_backward(dy, act_out)
    dh, dw, db = ops.conv2d_backward(dy, conv)
    if act_in is not None:
        dh = ops.silu_backward(dh, act_in)
    dx, dgamma, dbeta = ops.group_norm_backward(dh, norm)
    dshift = None
    if add is not None:
        dx, dshift = ops.add_channel_bias_backward(dx, add)
    return dx, dgamma, dbeta, dw, db, dshift


# --- the reference: the compositions on refdiff.nn.functional ------------------------------------------
def _reference_ops():
    from . import functional      # here, not at the top: this module is imported by refdiff.backend
    return functional


def conv2d_silu_forward(x, w, b, stride=1, padding=0):
    """SiLU(conv2d(x, w, b)). x (B, Cin, H, W), w (Cout, Cin, kH, kW), b (Cout,) or None -> (B, Cout, Ho, Wo)."""
    return conv2d_silu_forward_with(_reference_ops(), x, w, b, stride, padding)


def conv2d_silu_backward(dy, cache):
    """dy (B, Cout, Ho, Wo) -> dx, dw, db."""
    return conv2d_silu_backward_with(_reference_ops(), dy, cache)


def group_norm_conv2d_forward(x, num_groups, gamma, beta, w, b, shift=None, stride=1, padding=0, silu_in=False,
                              silu_out=False, eps=1e-5):
    """[SiLU](conv2d([SiLU](GroupNorm(x [+ shift])))). x (B, Cin, H, W), gamma, beta (Cin,), w (Cout, Cin, kH, kW),
    b (Cout,) or None, shift (B, Cin) or None -> (B, Cout, Ho, Wo)."""
    return group_norm_conv2d_forward_with(_reference_ops(), x, num_groups, gamma, beta, w, b, shift, stride,
                                          padding, silu_in, silu_out, eps)


def group_norm_conv2d_backward(dy, cache):
    """dy (B, Cout, Ho, Wo) -> dx, dgamma, dbeta, dw, db, dshift (None without a shift)."""
    return group_norm_conv2d_backward_with(_reference_ops(), dy, cache)


def fused_ops(ops):
    """The fused pairs a model's inference forward calls on backend `ops`: the backend's own
    where it has them (the numba backend's kernels), else these compositions run on the
    backend's own ops (the reference, cupy and numba-cuda: their pairs, their arrays)."""
    import types
    if all(hasattr(ops, name) for names in FUSED_PAIRS.values() for name in names):
        return ops
    ns = types.SimpleNamespace()
    for names in FUSED_PAIRS.values():
        for name in names:
            f = globals()[name + "_with"]
            setattr(ns, name, lambda *a, _f=f, **k: _f(ops, *a, **k))
    return ns
