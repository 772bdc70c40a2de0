"""Version 1 of the cupy backend: the reference ops (refdiff/nn/functional.py, conv.py,
norm.py, refdiff/nn/steps.py) ported line by line, numpy -> cupy."""
from __future__ import annotations

import cupy as cp
import numpy as np
from cupy.lib.stride_tricks import as_strided

from refdiff.nn.conv import _check_conv, _check_int, _conv_out, _convt_out, _frame
from refdiff.nn.norm import _check

from refdiff.nn.steps import ddpm_coeffs, em_coeffs


# --- functional.py ---------------------------------------------------------------------------------
def linear_forward(x, w, b):
    y = x @ w.T
    if b is not None:
        y = y + b
    return y, (x, w, b is not None)


def linear_backward(dy, cache):
    x, w, has_b = cache
    return dy @ w, dy.T @ x, (dy.sum(axis=0) if has_b else None)


def _sigmoid(x):
    return 0.5 * (1 + cp.tanh(0.5 * x))


def silu_forward(x):
    s = _sigmoid(x)
    return x * s, (x, s)


def silu_backward(dy, cache):
    x, s = cache
    return dy * (s * (1 + x * (1 - s)))


def relu_forward(x):
    return cp.maximum(x, 0), x > 0


def relu_backward(dy, cache):
    return dy * cache


def concat_forward(xs, axis=1):
    return cp.concatenate(xs, axis=axis), ([x.shape[axis] for x in xs], axis)


def concat_backward(dy, cache):
    sizes, axis = cache
    return cp.split(dy, np.cumsum(sizes)[:-1].tolist(), axis=axis)


def add_channel_bias_forward(x, v):
    return x + v.reshape(v.shape + (1,) * (x.ndim - 2)), x.ndim


def add_channel_bias_backward(dy, cache):
    ndim = cache
    return dy, dy.sum(axis=tuple(range(2, ndim))) if ndim > 2 else dy


def time_embedding(t, dim, base=10000.0, dtype=np.float32):
    t = cp.asarray(t, dtype=cp.float64).reshape(-1)
    tu, inv = cp.unique(t, return_inverse=True)
    k = cp.arange(dim)
    freq = base ** (-(k - k % 2) / dim)
    angle = tu[:, None] * freq[None, :]
    emb = cp.where(k % 2 == 0, cp.sin(angle), cp.cos(angle))
    return emb.astype(dtype)[inv.reshape(-1)]


def mse_forward(pred, target, weight=None):
    diff = pred - target
    per = cp.sum(diff.reshape(diff.shape[0], -1) ** 2, axis=1)
    w = cp.ones_like(per) if weight is None else cp.asarray(weight, dtype=per.dtype)
    return float(cp.mean(w * per)), (diff, w)


def mse_backward(cache):
    diff, w = cache
    scale = (2.0 / diff.shape[0]) * w
    return diff * scale.reshape((-1,) + (1,) * (diff.ndim - 1)).astype(diff.dtype)


def adam_update(p, g, m, v, lr, beta1, beta2, eps, step, weight_decay=0.0):
    if weight_decay:
        p *= 1 - lr * weight_decay
    m *= beta1
    m += (1 - beta1) * g
    v *= beta2
    v += (1 - beta2) * g * g
    bc1, bc2 = 1 - beta1 ** step, 1 - beta2 ** step
    denom = cp.sqrt(v) / np.sqrt(bc2) + eps
    p -= (lr / bc1) * m / denom


def ddpm_step(x, eps, z, beta, alpha_bar, sigma):
    coef, inv = ddpm_coeffs(beta, alpha_bar, x.dtype)
    out = (x - coef * eps) * inv
    if z is not None:
        out += x.dtype.type(sigma) * z
    return out


def em_step(x, score, z, a, g, dt):
    adt, g2dt, noise = em_coeffs(a, g, dt, x.dtype)
    out = x + adt * x + g2dt * score
    if z is not None:
        out += noise * z
    return out


# --- conv.py -------------------------------------------------------------------------------------
def _flat_pad(x, padding, L):
    B, C, H, W = x.shape
    Hp, Wp = H + 2 * padding, W + 2 * padding
    xf = cp.zeros((C, B, L), dtype=x.dtype)
    grid = xf[:, :, :Hp * Wp].reshape(C, B, Hp, Wp)
    grid[:, :, padding:padding + H, padding:padding + W] = x.transpose(1, 0, 2, 3)
    return xf


def _unflat_crop(xf, Wp, padding, H, W):
    C, B = xf.shape[:2]
    grid = xf[:, :, :(H + 2 * padding) * Wp].reshape(C, B, H + 2 * padding, Wp)
    return cp.ascontiguousarray(grid[:, :, padding:padding + H, padding:padding + W].transpose(1, 0, 2, 3))


def _widen(y, Wp):
    B, C, Ho, Wo = y.shape
    out = cp.zeros((C, B, Ho, Wp), dtype=y.dtype)
    out[:, :, :, :Wo] = y.transpose(1, 0, 2, 3)
    return out.reshape(C, B * Ho * Wp)


def _narrow(yw, B, Ho, Wp, Wo):
    C = yw.shape[0]
    return cp.ascontiguousarray(yw.reshape(C, B, Ho, Wp)[:, :, :, :Wo].transpose(1, 0, 2, 3))


def _im2col(xf, Wp, kH, kW, stride, n):
    C, B = xf.shape[:2]
    sC, sB, sL = xf.strides
    win = as_strided(xf, (C, kH, kW, B, n), (sC, Wp * sL, sL, sB, stride * sL))
    return cp.ascontiguousarray(win).reshape(C * kH * kW, B * n)


def _col2im(cols, B, L, Wp, kH, kW, stride):
    K, Bn = cols.shape
    C, n = K // (kH * kW), Bn // B
    out = cp.zeros((C, B, L), dtype=cols.dtype)
    c5 = cols.reshape(C, kH, kW, B, n)
    for i in range(kH):
        for j in range(kW):
            o = i * Wp + j
            out[:, :, o:o + stride * (n - 1) + 1:stride] += c5[:, i, j]
    return out


def _bias(b, dtype):
    return None if b is None else cp.asarray(b).astype(dtype, copy=False)


def conv2d_forward(x, w, b, stride=1, padding=0):
    stride, padding = _check_conv("conv2d", x, w, b, stride, padding, cin_axis=1)
    B, Cin, H, W = x.shape
    Cout, _, kH, kW = w.shape
    Ho, Wo = _conv_out("conv2d", H, kH, stride, padding), _conv_out("conv2d", W, kW, stride, padding)
    w, b = w.astype(x.dtype, copy=False), _bias(b, x.dtype)
    Wp, L = _frame(H, W, kH, kW, stride, padding, Ho)
    cols = _im2col(_flat_pad(x, padding, L), Wp, kH, kW, stride, Ho * Wp)
    y = _narrow(w.reshape(Cout, -1) @ cols, B, Ho, Wp, Wo)
    if b is not None:
        y += b[:, None, None]
    return y, (cols, w, x.shape, stride, padding, b is not None)


def conv2d_backward(dy, cache):
    cols, w, (B, Cin, H, W), stride, padding, has_b = cache
    Cout, _, kH, kW = w.shape
    Ho = dy.shape[2]
    dy = cp.asarray(dy, dtype=w.dtype)
    Wp, L = _frame(H, W, kH, kW, stride, padding, Ho)
    dyw = _widen(dy, Wp)
    dw = (dyw @ cols.T).reshape(w.shape)
    if stride == 1 and kH == kW and padding <= kH - 1:
        w_adj = w.transpose(1, 0, 2, 3)[:, :, ::-1, ::-1]
        dx, _ = conv2d_forward(dy, cp.ascontiguousarray(w_adj), None, 1, kH - 1 - padding)
    else:
        dcols = w.reshape(Cout, -1).T @ dyw
        dx = _unflat_crop(_col2im(dcols, B, L, Wp, kH, kW, stride), Wp, padding, H, W)
    db = dy.sum(axis=(0, 2, 3)) if has_b else None
    return dx, dw, db


def conv_transpose2d_forward(x, w, b, stride=1, padding=0):
    stride, padding = _check_conv("conv_transpose2d", x, w, b, stride, padding, cin_axis=0)
    B, Cin, H, W = x.shape
    _, Cout, kH, kW = w.shape
    Ho, Wo = _convt_out(H, kH, stride, padding), _convt_out(W, kW, stride, padding)
    w, b = w.astype(x.dtype, copy=False), _bias(b, x.dtype)
    Wf, L = _frame(Ho, Wo, kH, kW, stride, padding, H)
    xw = _widen(x, Wf)
    cols = w.reshape(Cin, -1).T @ xw
    y = _unflat_crop(_col2im(cols, B, L, Wf, kH, kW, stride), Wf, padding, Ho, Wo)
    if b is not None:
        y += b[:, None, None]
    return y, (xw, w, (H, W), stride, padding, b is not None)


def conv_transpose2d_backward(dy, cache):
    xw, w, (H, W), stride, padding, has_b = cache
    Cin, _, kH, kW = w.shape
    dy = cp.asarray(dy, dtype=w.dtype)
    B, _, Ho, Wo = dy.shape
    Wf, L = _frame(Ho, Wo, kH, kW, stride, padding, H)
    dcols = _im2col(_flat_pad(dy, padding, L), Wf, kH, kW, stride, H * Wf)
    dx = _narrow(w.reshape(Cin, -1) @ dcols, B, H, Wf, W)
    dw = (xw @ dcols.T).reshape(w.shape)
    db = dy.sum(axis=(0, 2, 3)) if has_b else None
    return dx, dw, db


def max_pool2d_forward(x, kernel_size, stride=None):
    k = _check_int("kernel_size", kernel_size, 1)
    s = k if stride is None else _check_int("stride", stride, 1)
    if x.ndim != 4 or x.shape[2] < k or x.shape[3] < k:
        raise ValueError(f"max_pool2d: x must be (B, C, H, W) with H, W >= kernel_size {k}; got {x.shape}")
    B, C, H, W = x.shape
    Ho, Wo = (H - k) // s + 1, (W - k) // s + 1
    x = cp.ascontiguousarray(x)
    sB, sC, sH, sW = x.strides
    win = as_strided(x, (B, C, Ho, Wo, k, k), (sB, sC, s * sH, s * sW, sH, sW)).reshape(B, C, Ho, Wo, k * k)
    arg = win.argmax(axis=-1)
    y = cp.take_along_axis(win, arg[..., None], axis=-1)[..., 0]
    return y, (arg, x.shape, k, s)


def max_pool2d_backward(dy, cache):
    arg, shape, k, s = cache
    Ho, Wo = arg.shape[2:]
    dx = cp.zeros(shape, dtype=dy.dtype)
    for t in range(k * k):
        i, j = divmod(t, k)
        dx[:, :, i:i + s * (Ho - 1) + 1:s, j:j + s * (Wo - 1) + 1:s] += cp.where(arg == t, dy, 0)
    return dx


# --- norm.py -------------------------------------------------------------------------------------
def group_norm_forward(x, num_groups, gamma, beta, eps=1e-5):
    _check(x, num_groups, gamma, beta)
    B, C = x.shape[:2]
    bshape = (1, C) + (1,) * (x.ndim - 2)
    gamma = gamma.astype(x.dtype, copy=False).reshape(bshape)
    beta = beta.astype(x.dtype, copy=False).reshape(bshape)
    xg = x.reshape(B, num_groups, -1)
    xc = xg - xg.mean(axis=2, keepdims=True)
    rstd = 1 / cp.sqrt((xc * xc).mean(axis=2, keepdims=True) + x.dtype.type(eps))
    xhat = (xc * rstd).reshape(x.shape)
    return xhat * gamma + beta, (xhat, rstd, gamma)


def group_norm_backward(dy, cache):
    xhat, rstd, gamma = cache
    B, C = xhat.shape[:2]
    G = rstd.shape[1]
    axes = (0,) + tuple(range(2, xhat.ndim))
    dy = cp.asarray(dy, dtype=xhat.dtype)
    dgamma, dbeta = (dy * xhat).sum(axis=axes), dy.sum(axis=axes)
    g = (dy * gamma).reshape(B, G, -1)
    xh = xhat.reshape(B, G, -1)
    dx = rstd * (g - g.mean(axis=2, keepdims=True) - xh * (g * xh).mean(axis=2, keepdims=True))
    return dx.reshape(xhat.shape), dgamma, dbeta


def group_norm_silu_forward(x, num_groups, gamma, beta, eps=1e-5):
    z, nc = group_norm_forward(x, num_groups, gamma, beta, eps)
    y, ac = silu_forward(z)
    return y, (nc, ac)


def group_norm_silu_backward(dy, cache):
    nc, ac = cache
    return group_norm_backward(silu_backward(dy, ac), nc)


KERNELS = {op: {1: fns} for op, fns in {
    "linear": (linear_forward, linear_backward), "silu": (silu_forward, silu_backward),
    "relu": (relu_forward, relu_backward), "concat": (concat_forward, concat_backward),
    "add_channel_bias": (add_channel_bias_forward, add_channel_bias_backward),
    "time_embedding": (time_embedding,), "mse": (mse_forward, mse_backward), "adam_update": (adam_update,),
    "ddpm_step": (ddpm_step,), "em_step": (em_step,),
    "conv2d": (conv2d_forward, conv2d_backward),
    "conv_transpose2d": (conv_transpose2d_forward, conv_transpose2d_backward),
    "max_pool2d": (max_pool2d_forward, max_pool2d_backward),
    "group_norm": (group_norm_forward, group_norm_backward),
    "group_norm_silu": (group_norm_silu_forward, group_norm_silu_backward),
}.items()}
