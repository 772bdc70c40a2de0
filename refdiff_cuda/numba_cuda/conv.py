"""@cuda.jit twins of refdiff/nn/conv.py: conv2d, conv_transpose2d (im2col + GEMM) and max_pool2d.

NCHW device arrays. One thread per entry everywhere, no atomics:
  _im2col     cols[(c,i,j), (b,r,q)] = x[b, c, r s + i - p, q s + j - p] (0 outside)
  _col2im     the adjoint as a *gather*: each image pixel sums the cols entries of every
              tap that lands on it, taps in the reference's (i, j) order (no scatter races)
  _cm_to_nchw / _nchw_to_cm   (C, B n) <-> (B, C, n), the former adding the bias
conv2d:            y = w cols(x);  dw = dy cols^T;  dx = col2im(w^T dy)
conv_transpose2d:  y = col2im(w^T x) (+ b);  dx = w im2col(dy);  dw = x im2col(dy)^T
(the reference's algebra; the stride-1 branch of its conv2d backward is a CPU memory
optimisation not needed here.) Versions: 1 = blas.gemm version 1, 2 = tiled GEMM.
"""
from __future__ import annotations

import numpy as np
from numba import cuda

from refdiff.nn.conv import _check_conv, _check_int, _conv_out, _convt_out

from .blas import gemm
from .functional import _t, flat, launch


@cuda.jit
def _im2col(x, cols, C, B, H, W, kH, kW, s, p, Ho, Wo, zero):
    idx = cuda.grid(1)
    n = Ho * Wo
    if idx < C * kH * kW * B * n:
        row, m = idx // (B * n), idx % (B * n)
        c, i, j = row // (kH * kW), (row // kW) % kH, row % kW
        b, r, q = m // n, (m % n) // Wo, m % Wo
        ii, jj = r * s + i - p, q * s + j - p
        if ii >= 0 and ii < H and jj >= 0 and jj < W:
            cols[idx] = x[((b * C + c) * H + ii) * W + jj]
        else:
            cols[idx] = zero


@cuda.jit
def _col2im(cols, out, bias, has_b, C, B, H, W, kH, kW, s, p, Ho, Wo, zero):
    idx = cuda.grid(1)
    if idx < B * C * H * W:
        b, c = idx // (C * H * W), (idx // (H * W)) % C
        ii, jj = (idx // W) % H, idx % W
        n = Ho * Wo
        acc = zero
        for i in range(kH):
            rr = ii + p - i                      # = r s for the output row r that reads (ii, .)
            if rr < 0 or rr % s != 0 or rr // s >= Ho:
                continue
            for j in range(kW):
                qq = jj + p - j
                if qq < 0 or qq % s != 0 or qq // s >= Wo:
                    continue
                acc += cols[((c * kH + i) * kW + j) * B * n + b * n + (rr // s) * Wo + qq // s]
        if has_b:
            acc += bias[c]
        out[idx] = acc


@cuda.jit
def _cm_to_nchw(Y, bias, has_b, y, C, B, n):
    idx = cuda.grid(1)
    if idx < C * B * n:
        b, c, m = idx // (C * n), (idx // n) % C, idx % n
        v = Y[c * B * n + b * n + m]
        y[idx] = v + bias[c] if has_b else v


@cuda.jit
def _nchw_to_cm(y, Y, C, B, n):
    idx = cuda.grid(1)
    if idx < C * B * n:
        c, b, m = idx // (B * n), (idx // n) % B, idx % n
        Y[idx] = y[(b * C + c) * n + m]


@cuda.jit
def _channel_sums(x, out, C, B, n, zero):        # out[c] = sum_{b, m} x[b, c, m]
    c = cuda.grid(1)
    if c < C:
        acc = zero
        for b in range(B):
            for m in range(n):
                acc += x[(b * C + c) * n + m]
        out[c] = acc


def _im2col_dev(A, xd, kH, kW, s, p, Ho, Wo):
    B, C, H, W = xd.shape
    cols = A.empty((C * kH * kW, B * Ho * Wo), xd.dtype)
    launch(_im2col, cols.size, flat(xd), flat(cols), C, B, H, W, kH, kW, s, p, Ho, Wo, _t(xd.dtype, 0))
    return cols


def _col2im_dev(A, cols, C, B, H, W, kH, kW, s, p, Ho, Wo, bias=None):
    out = A.empty((B, C, H, W), cols.dtype)
    bd = bias if bias is not None else A.zeros((1,), cols.dtype)
    launch(_col2im, out.size, flat(cols), flat(out), bd, bias is not None, C, B, H, W, kH, kW, s, p, Ho, Wo,
           _t(cols.dtype, 0))
    return out


def _to_cm(A, yd):
    B, C = yd.shape[:2]
    n = yd.size // (B * C)
    Y = A.empty((C, B * n), yd.dtype)
    launch(_nchw_to_cm, yd.size, flat(yd), flat(Y), C, B, n)
    return Y


def _from_cm(A, Y, B, shape_tail, bias=None):
    C = Y.shape[0]
    n = Y.shape[1] // B
    y = A.empty((B, C) + tuple(shape_tail), Y.dtype)
    bd = bias if bias is not None else A.zeros((1,), Y.dtype)
    launch(_cm_to_nchw, y.size, flat(Y), bd, bias is not None, flat(y), C, B, n)
    return y


def _db(A, dyd):
    B, C = dyd.shape[:2]
    db = A.empty((C,), dyd.dtype)
    launch(_channel_sums, C, flat(dyd), db, C, B, dyd.size // (B * C), _t(dyd.dtype, 0))
    return db


def _conv2d(version):
    def forward(A, x, w, b, stride=1, padding=0):
        stride, padding = _check_conv("conv2d", x, w, b, stride, padding, cin_axis=1)
        xd = A.dev(x)
        dt = np.dtype(xd.dtype)
        wd = A.dev(w, dt)
        B, Cin, H, W = xd.shape
        Cout, _, kH, kW = wd.shape
        Ho, Wo = _conv_out("conv2d", H, kH, stride, padding), _conv_out("conv2d", W, kW, stride, padding)
        cols = _im2col_dev(A, xd, kH, kW, stride, padding, Ho, Wo)            # (K, B n)
        K, N = cols.shape
        Y = gemm(A, wd, False, cols, False, Cout, N, K, dt, version)         # (Cout, B n)
        y = _from_cm(A, Y, B, (Ho, Wo), None if b is None else A.dev(b, dt))
        return A.out(y), (cols, wd, (B, Cin, H, W), stride, padding, b is not None)

    def backward(A, dy, cache):
        cols, wd, (B, Cin, H, W), stride, padding, has_b = cache
        dt = np.dtype(wd.dtype)
        Cout, _, kH, kW = wd.shape
        dyd = A.dev(dy, dt)
        Ho, Wo = dyd.shape[2:]
        K, N = cols.shape
        dY = _to_cm(A, dyd)                                                  # (Cout, B n)
        dw = gemm(A, dY, False, cols, True, Cout, K, N, dt, version)          # dY cols^T
        dcols = gemm(A, wd, True, dY, False, K, N, Cout, dt, version)         # w^T dY
        dx = _col2im_dev(A, dcols, Cin, B, H, W, kH, kW, stride, padding, Ho, Wo)
        db = _db(A, dyd) if has_b else None
        return A.out(dx), A.out(dw.reshape(wd.shape)), (None if db is None else A.out(db))
    return forward, backward


def _conv_transpose2d(version):
    def forward(A, x, w, b, stride=1, padding=0):
        stride, padding = _check_conv("conv_transpose2d", x, w, b, stride, padding, cin_axis=0)
        xd = A.dev(x)
        dt = np.dtype(xd.dtype)
        wd = A.dev(w, dt)
        B, Cin, H, W = xd.shape
        _, Cout, kH, kW = wd.shape
        Ho, Wo = _convt_out(H, kH, stride, padding), _convt_out(W, kW, stride, padding)
        X = _to_cm(A, xd)                                                    # (Cin, B H W)
        K = Cout * kH * kW
        cols = gemm(A, wd, True, X, False, K, X.shape[1], Cin, dt, version)   # w^T X
        y = _col2im_dev(A, cols, Cout, B, Ho, Wo, kH, kW, stride, padding, H, W,
                        None if b is None else A.dev(b, dt))
        return A.out(y), (X, wd, (H, W), stride, padding, b is not None)

    def backward(A, dy, cache):
        X, wd, (H, W), stride, padding, has_b = cache
        dt = np.dtype(wd.dtype)
        Cin, Cout, kH, kW = wd.shape
        dyd = A.dev(dy, dt)
        B = dyd.shape[0]
        dcols = _im2col_dev(A, dyd, kH, kW, stride, padding, H, W)           # (Cout kH kW, B H W)
        K, N = dcols.shape
        dX = gemm(A, wd, False, dcols, False, Cin, N, K, dt, version)         # w dcols
        dx = _from_cm(A, dX, B, (H, W))
        dw = gemm(A, X, False, dcols, True, Cin, K, N, dt, version)           # X dcols^T
        db = _db(A, dyd) if has_b else None
        return A.out(dx), A.out(dw.reshape(wd.shape)), (None if db is None else A.out(db))
    return forward, backward


# --- max_pool2d ----------------------------------------------------------------------------------
@cuda.jit
def _pool_fwd(x, y, arg, P, H, W, k, s, Ho, Wo):
    idx = cuda.grid(1)
    if idx < P * Ho * Wo:
        pl, r, q = idx // (Ho * Wo), (idx // Wo) % Ho, idx % Wo
        base = pl * H * W
        best = x[base + (r * s) * W + q * s]
        bi = 0
        for t in range(k * k):
            v = x[base + (r * s + t // k) * W + q * s + t % k]
            if v > best or (v != v and best == best):       # first max (first NaN) wins
                best = v
                bi = t
        y[idx] = best
        arg[idx] = bi


@cuda.jit
def _pool_bwd(dy, arg, dx, P, H, W, k, s, Ho, Wo, zero):
    idx = cuda.grid(1)                                       # gather: one thread per input pixel
    if idx < P * H * W:
        pl, ii, jj = idx // (H * W), (idx // W) % H, idx % W
        acc = zero
        for i in range(k):
            rr = ii - i
            if rr < 0 or rr % s != 0 or rr // s >= Ho:
                continue
            for j in range(k):
                qq = jj - j
                if qq < 0 or qq % s != 0 or qq // s >= Wo:
                    continue
                o = pl * Ho * Wo + (rr // s) * Wo + qq // s
                if arg[o] == i * k + j:
                    acc += dy[o]
        dx[idx] = acc


def max_pool2d_forward(A, x, kernel_size, stride=None):
    k = _check_int("kernel_size", kernel_size, 1)
    s = k if stride is None else _check_int("stride", stride, 1)
    if x.ndim != 4 or x.shape[2] < k or x.shape[3] < k:
        raise ValueError(f"max_pool2d: x must be (B, C, H, W) with H, W >= kernel_size {k}; got {x.shape}")
    xd = A.dev(x)
    B, C, H, W = xd.shape
    Ho, Wo = (H - k) // s + 1, (W - k) // s + 1
    y, arg = A.empty((B, C, Ho, Wo), xd.dtype), A.empty((B, C, Ho, Wo), np.int32)
    launch(_pool_fwd, y.size, flat(xd), flat(y), flat(arg), B * C, H, W, k, s, Ho, Wo)
    return A.out(y), (arg, xd.shape, k, s)


def max_pool2d_backward(A, dy, cache):
    arg, (B, C, H, W), k, s = cache
    dyd = A.dev(dy)
    Ho, Wo = dyd.shape[2:]
    dx = A.empty((B, C, H, W), dyd.dtype)
    launch(_pool_bwd, dx.size, flat(dyd), flat(arg), flat(dx), B * C, H, W, k, s, Ho, Wo, _t(dyd.dtype, 0))
    return A.out(dx)


KERNELS = {
    "conv2d": {1: _conv2d(1), 2: _conv2d(2)},
    "conv_transpose2d": {1: _conv_transpose2d(1), 2: _conv_transpose2d(2)},
    "max_pool2d": {1: (max_pool2d_forward, max_pool2d_backward)},
}
