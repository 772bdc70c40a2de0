"""Numba (CPU) twins of refdiff/nn/conv.py: conv2d, conv_transpose2d, max_pool2d.

Version 1 is a literal port of the reference: its wide-row frame (_frame), _flat_pad,
_im2col, _col2im, _widen and _narrow as serial @njit loops, the same GEMMs (np.dot, i.e.
BLAS), the same branch for conv2d's stride-1 input gradient.

Version 2 keeps activations channel-major (see _layout.py) and changes three things:
  * im2col writes the compact (Cin kH kW, B Ho Wo) matrix straight from the (Cin, B, H, W)
    buffer in one parallel pass (no padded copy, no garbage columns), plus a row of ones
    when there is a bias: w' = [w | b] then makes the bias part of the GEMM (and db part of
    dw' = dy cols'^T), so no epilogue pass is needed;
  * the GEMM output (Cout, B Ho Wo) *is* the channel-major result: no transpose;
  * every product runs on numba's threads as single-threaded BLAS calls (_blas.matmul,
    matmul_nt), never through NumPy's threaded OpenBLAS (see _blas.py for why); and
    a b^T is split over the summed axis, because NumPy's OpenBLAS is pathologically slow
    on a (10, N) x (N, 90) product (0.1 GFLOP/s measured), the reference's dw shape.
col2im (conv2d's input gradient for stride > 1, conv_transpose2d's forward) is a parallel
loop over (channel, sample) planes, each owned by one thread: no atomics, and each entry
sums its taps in the reference's (i, j) order.
"""
from __future__ import annotations

import numpy as np
from numba import get_num_threads, get_thread_id, njit, prange

from refdiff.nn.conv import _check_conv, _check_int, _conv_out, _convt_out, _frame

from ._blas import gemm, matmul, matmul_nt
from ._layout import cm, nchw

_JIT = dict(cache=True, fastmath=False)


# ================================ version 1: literal port ======================================
@njit(**_JIT)
def _flat_pad_v1(x, padding, L):
    B, C, H, W = x.shape
    Wp = W + 2 * padding
    xf = np.zeros((C, B, L), x.dtype)
    for c in range(C):
        for b in range(B):
            for r in range(H):
                for q in range(W):
                    xf[c, b, (r + padding) * Wp + q + padding] = x[b, c, r, q]
    return xf


@njit(**_JIT)
def _im2col_v1(xf, Wp, kH, kW, stride, n):
    C, B, L = xf.shape
    cols = np.empty((C * kH * kW, B * n), xf.dtype)
    for c in range(C):
        for i in range(kH):
            for j in range(kW):
                row = (c * kH + i) * kW + j
                for b in range(B):
                    for m in range(n):
                        cols[row, b * n + m] = xf[c, b, i * Wp + j + stride * m]
    return cols


@njit(**_JIT)
def _col2im_v1(cols, B, L, Wp, kH, kW, stride):
    K, Bn = cols.shape
    C, n = K // (kH * kW), Bn // B
    out = np.zeros((C, B, L), cols.dtype)
    for i in range(kH):                       # one add per tap, taps in (i, j) order
        for j in range(kW):
            o = i * Wp + j
            for c in range(C):
                row = (c * kH + i) * kW + j
                for b in range(B):
                    for m in range(n):
                        out[c, b, o + stride * m] += cols[row, b * n + m]
    return out


@njit(**_JIT)
def _narrow_v1(yw, B, Ho, Wp, Wo):
    C = yw.shape[0]
    y = np.empty((B, C, Ho, Wo), yw.dtype)
    for b in range(B):
        for c in range(C):
            for r in range(Ho):
                for q in range(Wo):
                    y[b, c, r, q] = yw[c, (b * Ho + r) * Wp + q]
    return y


@njit(**_JIT)
def _widen_v1(y, Wp):
    B, C, Ho, Wo = y.shape
    out = np.zeros((C, B * Ho * Wp), y.dtype)
    for b in range(B):
        for c in range(C):
            for r in range(Ho):
                for q in range(Wo):
                    out[c, (b * Ho + r) * Wp + q] = y[b, c, r, q]
    return out


@njit(**_JIT)
def _unflat_crop_v1(xf, Wp, padding, H, W):
    C, B, L = xf.shape
    x = np.empty((B, C, H, W), xf.dtype)
    for b in range(B):
        for c in range(C):
            for r in range(H):
                for q in range(W):
                    x[b, c, r, q] = xf[c, b, (r + padding) * Wp + q + padding]
    return x


@njit(**_JIT)
def _add_bias_v1(y, b):
    B, C, H, W = y.shape
    for bb in range(B):
        for c in range(C):
            for r in range(H):
                for q in range(W):
                    y[bb, c, r, q] += b[c]


def _prep(x, w, b):
    x = np.ascontiguousarray(x)
    return x, np.ascontiguousarray(w, dtype=x.dtype), (None if b is None else np.ascontiguousarray(b, dtype=x.dtype))


def conv2d_forward_v1(x, w, b, stride=1, padding=0):
    stride, padding = _check_conv("conv2d", x, w, b, stride, padding, cin_axis=1)
    x, w, b = _prep(x, w, b)
    B, Cin, H, W = x.shape
    Cout, _, kH, kW = w.shape
    Ho, Wo = _conv_out("conv2d", H, kH, stride, padding), _conv_out("conv2d", W, kW, stride, padding)
    Wp, L = _frame(H, W, kH, kW, stride, padding, Ho)
    cols = _im2col_v1(_flat_pad_v1(x, padding, L), Wp, kH, kW, stride, Ho * Wp)
    y = _narrow_v1(np.dot(w.reshape(Cout, -1), cols), B, Ho, Wp, Wo)
    if b is not None:
        _add_bias_v1(y, b)
    return y, (cols, w, x.shape, stride, padding, b is not None)


def conv2d_backward_v1(dy, cache):
    cols, w, (B, Cin, H, W), stride, padding, has_b = cache
    Cout, _, kH, kW = w.shape
    dy = np.ascontiguousarray(dy, dtype=w.dtype)
    Ho = dy.shape[2]
    Wp, L = _frame(H, W, kH, kW, stride, padding, Ho)
    dyw = _widen_v1(dy, Wp)
    dw = np.dot(dyw, np.ascontiguousarray(cols.T)).reshape(w.shape)
    if stride == 1 and kH == kW and padding <= kH - 1:
        w_adj = np.ascontiguousarray(w.transpose(1, 0, 2, 3)[:, :, ::-1, ::-1])
        dx, _ = conv2d_forward_v1(dy, w_adj, None, 1, kH - 1 - padding)
    else:
        dcols = np.dot(np.ascontiguousarray(w.reshape(Cout, -1).T), dyw)
        dx = _unflat_crop_v1(_col2im_v1(dcols, B, L, Wp, kH, kW, stride), Wp, padding, H, W)
    db = dy.sum(axis=(0, 2, 3)) if has_b else None
    return dx, dw, db


def conv_transpose2d_forward_v1(x, w, b, stride=1, padding=0):
    stride, padding = _check_conv("conv_transpose2d", x, w, b, stride, padding, cin_axis=0)
    x, w, b = _prep(x, w, b)
    B, Cin, H, W = x.shape
    _, Cout, kH, kW = w.shape
    Ho, Wo = _convt_out(H, kH, stride, padding), _convt_out(W, kW, stride, padding)
    Wf, L = _frame(Ho, Wo, kH, kW, stride, padding, H)
    xw = _widen_v1(x, Wf)
    cols = np.dot(np.ascontiguousarray(w.reshape(Cin, -1).T), xw)
    y = _unflat_crop_v1(_col2im_v1(cols, B, L, Wf, kH, kW, stride), Wf, padding, Ho, Wo)
    if b is not None:
        _add_bias_v1(y, b)
    return y, (xw, w, (H, W), stride, padding, b is not None)


def conv_transpose2d_backward_v1(dy, cache):
    xw, w, (H, W), stride, padding, has_b = cache
    Cin, _, kH, kW = w.shape
    dy = np.ascontiguousarray(dy, dtype=w.dtype)
    B, _, Ho, Wo = dy.shape
    Wf, L = _frame(Ho, Wo, kH, kW, stride, padding, H)
    dcols = _im2col_v1(_flat_pad_v1(dy, padding, L), Wf, kH, kW, stride, H * Wf)
    dx = _narrow_v1(np.dot(w.reshape(Cin, -1), dcols), B, H, Wf, W)
    dw = np.dot(xw, np.ascontiguousarray(dcols.T)).reshape(w.shape)
    db = dy.sum(axis=(0, 2, 3)) if has_b else None
    return dx, dw, db


# ============================ version 2: channel-major, parallel ===============================
@njit(parallel=True, **_JIT)
def _im2col_cm(x, kH, kW, stride, pad, Ho, Wo, ones_row):
    """x (C, B, H, W) -> cols (C kH kW [+1], B Ho Wo): cols[(c,i,j), (b,r,q)] =
    x[c, b, r s + i - p, q s + j - p] (0 outside); the extra last row is all ones.
    One task per (row, sample): a run of Ho Wo entries, copied as Ho slices (contiguous for
    stride 1, which lets LLVM vectorise the copy)."""
    C, B, H, W = x.shape
    K, n = C * kH * kW, Ho * Wo
    cols = np.empty((K + (1 if ones_row else 0), B * n), x.dtype)
    for task in prange(K * B):
        row, b = task // B, task % B
        c, i, j = row // (kH * kW), (row // kW) % kH, row % kW
        q0 = min(Wo, max(0, (pad - j + stride - 1) // stride))   # valid q: 0 <= q s + j - p < W
        q1 = max(q0, min(Wo, (W - 1 + pad - j) // stride + 1)) if W - 1 + pad - j >= 0 else q0
        dst = cols[row, b * n:(b + 1) * n]
        src = x[c, b]
        for r in range(Ho):
            ii = r * stride + i - pad
            o = r * Wo
            if ii < 0 or ii >= H:
                dst[o:o + Wo] = 0
                continue
            dst[o:o + q0] = 0
            lo = q0 * stride + j - pad
            if stride == 1:
                dst[o + q0:o + q1] = src[ii, lo:lo + q1 - q0]
            else:
                for q in range(q0, q1):
                    dst[o + q] = src[ii, lo + (q - q0) * stride]
            dst[o + q1:o + Wo] = 0
    if ones_row:
        cols[K] = 1
    return cols


@njit(parallel=True, **_JIT)
def _col2im_cm(cols, C, B, H, W, kH, kW, stride, pad, Ho, Wo, bias, has_b):
    """Adjoint of _im2col_cm: out (C, B, H, W) = sum over taps of cols, then + bias[c]."""
    out = np.zeros((C, B, H, W), cols.dtype)
    n = Ho * Wo
    for task in prange(C * B):
        c, b = task // B, task % B
        for i in range(kH):
            for j in range(kW):
                row = (c * kH + i) * kW + j
                for r in range(Ho):
                    ii = r * stride + i - pad
                    if ii < 0 or ii >= H:
                        continue
                    o = b * n + r * Wo
                    for q in range(Wo):
                        jj = q * stride + j - pad
                        if jj >= 0 and jj < W:
                            out[c, b, ii, jj] += cols[row, o + q]
        if has_b:
            bc = bias[c]
            for ii in range(H):
                for jj in range(W):
                    out[c, b, ii, jj] += bc
    return out


def _gemm_nt(a, b):
    """a b^T (see _blas.matmul_nt: numba's threads, single-threaded BLAS calls)."""
    return matmul_nt(a, b)


def conv2d_forward_v2(x, w, b, stride=1, padding=0):
    stride, padding = _check_conv("conv2d", x, w, b, stride, padding, cin_axis=1)
    dt = np.asarray(x).dtype
    B, Cin, H, W = x.shape
    Cout, _, kH, kW = w.shape
    Ho, Wo = _conv_out("conv2d", H, kH, stride, padding), _conv_out("conv2d", W, kW, stride, padding)
    w = np.asarray(w, dtype=dt)
    w2 = w.reshape(Cout, -1)
    if b is not None:
        w2 = np.concatenate([w2, np.asarray(b, dtype=dt).reshape(Cout, 1)], axis=1)   # w' = [w | b]
    cols = _im2col_cm(cm(x), kH, kW, stride, padding, Ho, Wo, b is not None)         # (K[+1], B Ho Wo)
    y = matmul(w2, cols)                                                                    # (Cout, B Ho Wo)
    return nchw(y.reshape(Cout, B, Ho, Wo)), (cols, w, (B, Cin, H, W), stride, padding, b is not None)


def conv2d_backward_v2(dy, cache):
    cols, w, (B, Cin, H, W), stride, padding, has_b = cache
    Cout, _, kH, kW = w.shape
    K = Cin * kH * kW
    dyc = cm(dy, w.dtype)                                   # (Cout, B, Ho, Wo)
    dw2 = _gemm_nt(dyc.reshape(Cout, -1), cols)             # (Cout, K[+1]); last column = db
    dw = np.ascontiguousarray(dw2[:, :K]).reshape(w.shape)
    db = np.ascontiguousarray(dw2[:, K]) if has_b else None
    if stride == 1 and kH == kW and padding <= kH - 1:
        # dx = conv2d(dy, w flipped, Cin <-> Cout, padding k-1-p): one more im2col + GEMM
        w_adj = np.ascontiguousarray(w.transpose(1, 0, 2, 3)[:, :, ::-1, ::-1]).reshape(Cin, -1)
        dX = matmul(w_adj, _im2col_cm(dyc, kH, kW, 1, kH - 1 - padding, H, W, False))
        dx = nchw(dX.reshape(Cin, B, H, W))
    else:
        dx = dx_col2im(dyc, w, (B, Cin, H, W), stride, padding)
    return dx, dw, db


def dx_col2im(dyc, w, shape, stride, padding):
    """The input gradient of any conv2d, col2im(w^T dy): dyc (Cout, B, Ho, Wo) channel-major,
    w (Cout, Cin, kH, kW), shape the input's (B, Cin, H, W) -> dx (B, Cin, H, W) (a channel-major view)."""
    B, Cin, H, W = shape
    Cout, _, kH, kW = w.shape
    dcols = matmul(w.reshape(Cout, -1).T, dyc.reshape(Cout, -1))    # (Cin kH kW, B Ho Wo)
    return nchw(_col2im_cm(dcols, Cin, B, H, W, kH, kW, stride, padding, dyc.shape[2], dyc.shape[3], w[0, 0, 0],
                           False))


def conv_transpose2d_forward_v2(x, w, b, stride=1, padding=0):
    stride, padding = _check_conv("conv_transpose2d", x, w, b, stride, padding, cin_axis=0)
    dt = np.asarray(x).dtype
    B, Cin, H, W = x.shape
    _, Cout, kH, kW = w.shape
    Ho, Wo = _convt_out(H, kH, stride, padding), _convt_out(W, kW, stride, padding)
    w = np.asarray(w, dtype=dt)
    X = cm(x).reshape(Cin, -1)                              # (Cin, B H W)
    cols = matmul(w.reshape(Cin, -1).T, X)                        # (Cout kH kW, B H W)
    bias = np.zeros(Cout, dt) if b is None else np.ascontiguousarray(b, dtype=dt)
    y = _col2im_cm(cols, Cout, B, Ho, Wo, kH, kW, stride, padding, H, W, bias, b is not None)
    return nchw(y), (X, w, (H, W), stride, padding, b is not None)


def conv_transpose2d_backward_v2(dy, cache):
    X, w, (H, W), stride, padding, has_b = cache
    Cin, Cout, kH, kW = w.shape
    dyc = cm(dy, w.dtype)                                   # (Cout, B, Ho, Wo)
    B = dyc.shape[1]
    dcols = _im2col_cm(dyc, kH, kW, stride, padding, H, W, False)   # (Cout kH kW, B H W)
    dx = nchw(matmul(w.reshape(Cin, -1), dcols).reshape(Cin, B, H, W))
    dw = _gemm_nt(X, dcols).reshape(w.shape)
    db = dyc.reshape(Cout, -1).sum(axis=1) if has_b else None
    return dx, np.ascontiguousarray(dw), db


# ====================== version 3: im2col fused with the GEMM, per batch chunk =====================
# Version 2 writes the whole (Cin kH kW, B Ho Wo) cols matrix (36 MB for unet-seed's 28 x 28
# layers at batch 128), reads it back for the GEMM, and keeps it for the backward: the conv
# is memory-bound on cols. Version 3, for stride-1 square convs with images of at least
# 7 x 7 (the UNet's 3 x 3 convs), runs one parallel loop over chunks of `cb` samples: each
# thread im2cols its chunk into its own buffer sized to stay in its L2 cache (~0.5 MB) and
# calls a single-threaded BLAS GEMM on it right away (_blas.gemm), writing the chunk's
# columns of the channel-major output. cols never reaches DRAM and is not cached: the
# backward recomputes it per chunk, accumulates dw' per thread (then sums the threads'
# partials) and computes dx chunk by chunk as conv2d(dy, w flipped). Other convs use version 2.
_L2_FLOATS = 131072


@njit(**_JIT)
def _im2col_chunk(x, kH, kW, pad, Ho, Wo, b0, nb, ones_row, cols):
    """Stride-1 im2col of samples b0 .. b0+nb-1 of x (C, B, H, W) into cols[:, :nb Ho Wo]."""
    C, B, H, W = x.shape
    K, n = C * kH * kW, Ho * Wo
    for row in range(K):
        c, i, j = row // (kH * kW), (row // kW) % kH, row % kW
        q0 = min(Wo, max(0, pad - j))
        q1 = max(q0, min(Wo, W + pad - j))
        for bb in range(nb):
            dst = cols[row, bb * n:(bb + 1) * n]
            src = x[c, b0 + bb]
            for r in range(Ho):
                ii = r + i - pad
                o = r * Wo
                if ii < 0 or ii >= H:
                    dst[o:o + Wo] = 0
                    continue
                dst[o:o + q0] = 0
                dst[o + q0:o + q1] = src[ii, q0 + j - pad:q1 + j - pad]
                dst[o + q1:o + Wo] = 0
    if ones_row:
        cols[K, :nb * n] = 1


@njit(parallel=True, cache=True)
def _conv_fwd_v3(x, w2, kH, kW, pad, Ho, Wo, ones_row, cb, Y, scratch):
    C, B, H, W = x.shape
    Cout, Kp = w2.shape
    n = Ho * Wo
    for ch in prange((B + cb - 1) // cb):
        cols = scratch[get_thread_id()]
        b0 = ch * cb
        nb = min(cb, B - b0)
        _im2col_chunk(x, kH, kW, pad, Ho, Wo, b0, nb, ones_row, cols)
        gemm(Cout, nb * n, Kp, w2.reshape(-1), 0, Kp, cols.reshape(-1), 0, cb * n, False,
             Y.reshape(-1), b0 * n, B * n, 0.0)


@njit(parallel=True, cache=True)
def _conv_bwd_v3(x, dyc, w2, w_adj, kH, kW, pad, ones_row, cb, dw_part, dX, scratch, scratch2):
    C, B, H, W = x.shape
    Cout, Kp = w2.shape
    Ho, Wo = dyc.shape[2], dyc.shape[3]
    n, nin, K2 = Ho * Wo, H * W, w_adj.shape[1]
    dY = dyc.reshape(-1)
    for ch in prange((B + cb - 1) // cb):
        tid = get_thread_id()
        b0 = ch * cb
        nb = min(cb, B - b0)
        cols = scratch[tid]
        _im2col_chunk(x, kH, kW, pad, Ho, Wo, b0, nb, ones_row, cols)
        # dw'[tid] += dY[:, chunk] cols^T
        gemm(Cout, Kp, nb * n, dY, b0 * n, B * n, cols.reshape(-1), 0, cb * n, True,
             dw_part[tid].reshape(-1), 0, Kp, 1.0)
        # dx[:, chunk] = w_adj im2col(dy chunk, padding k-1-p)
        dcols = scratch2[tid]
        _im2col_chunk(dyc, kH, kW, kH - 1 - pad, H, W, b0, nb, False, dcols)
        gemm(C, nb * nin, K2, w_adj.reshape(-1), 0, K2, dcols.reshape(-1), 0, cb * nin, False,
             dX.reshape(-1), b0 * nin, B * nin, 0.0)


def _v3_applies(stride, padding, kH, kW, Ho, Wo):
    return stride == 1 and kH == kW and padding <= kH - 1 and Ho * Wo >= 49


def conv2d_forward_v3(x, w, b, stride=1, padding=0):
    stride, padding = _check_conv("conv2d", x, w, b, stride, padding, cin_axis=1)
    B, Cin, H, W = x.shape
    Cout, _, kH, kW = w.shape
    Ho, Wo = _conv_out("conv2d", H, kH, stride, padding), _conv_out("conv2d", W, kW, stride, padding)
    if not _v3_applies(stride, padding, kH, kW, Ho, Wo):
        y, cache = conv2d_forward_v2(x, w, b, stride, padding)
        return y, ("v2", cache)
    dt = np.asarray(x).dtype
    w = np.asarray(w, dtype=dt)
    w2 = w.reshape(Cout, -1)
    if b is not None:
        w2 = np.concatenate([w2, np.asarray(b, dtype=dt).reshape(Cout, 1)], axis=1)
    w2 = np.ascontiguousarray(w2)
    Kp, n = w2.shape[1], Ho * Wo
    cb = max(1, min(B, _L2_FLOATS // (Kp * n)))
    xc = cm(x)
    Y = np.empty((Cout, B * n), dt)
    _conv_fwd_v3(xc, w2, kH, kW, padding, Ho, Wo, b is not None, cb, Y,
                 np.empty((get_num_threads(), Kp, cb * n), dt))
    return nchw(Y.reshape(Cout, B, Ho, Wo)), ("v3", (xc, w, w2, padding, b is not None, cb))


def conv2d_backward_v3(dy, cache):
    kind, cache = cache
    if kind == "v2":
        return conv2d_backward_v2(dy, cache)
    xc, w, w2, padding, has_b, cb = cache
    Cin, B, H, W = xc.shape
    Cout, _, kH, kW = w.shape
    dt = xc.dtype
    dyc = cm(dy, dt)
    Ho, Wo = dyc.shape[2:]
    Kp, K2 = w2.shape[1], Cout * kH * kW
    w_adj = np.ascontiguousarray(w.transpose(1, 0, 2, 3)[:, :, ::-1, ::-1]).reshape(Cin, K2)
    T = get_num_threads()
    dw_part = np.zeros((T, Cout, Kp), dt)
    dX = np.empty((Cin, B * H * W), dt)
    _conv_bwd_v3(xc, dyc, w2, w_adj, kH, kW, padding, has_b, cb, dw_part, dX,
                 np.empty((T, Kp, cb * Ho * Wo), dt), np.empty((T, K2, cb * H * W), dt))
    dw2 = dw_part.sum(axis=0)
    K = Kp - (1 if has_b else 0)
    return (nchw(dX.reshape(Cin, B, H, W)), np.ascontiguousarray(dw2[:, :K]).reshape(w.shape),
            (np.ascontiguousarray(dw2[:, K]) if has_b else None))


# ================================= max_pool2d ==================================================
@njit(parallel=True, **_JIT)
def _pool_fwd(x, k, s, Ho, Wo, y, arg):
    """x (P, H, W) planes (any plane order) -> y, arg (P, Ho, Wo); first max wins ties."""
    for p in prange(x.shape[0]):
        for r in range(Ho):
            for q in range(Wo):
                best, bi = x[p, r * s, q * s], 0
                for t in range(k * k):
                    v = x[p, r * s + t // k, q * s + t % k]
                    if v > best or (v != v and best == best):   # NaN wins, as argmax
                        best, bi = v, t
                y[p, r, q], arg[p, r, q] = best, bi


@njit(parallel=True, **_JIT)
def _pool_bwd(dy, arg, k, s, H, W, dx):
    for p in prange(dy.shape[0]):
        for r in range(H):
            for q in range(W):
                dx[p, r, q] = 0
        for r in range(dy.shape[1]):
            for q in range(dy.shape[2]):
                t = arg[p, r, q]
                dx[p, r * s + t // k, q * s + t % k] += dy[p, r, q]


def _planes(x, channel_major=None):
    """(B, C, H, W) -> contiguous (P, H, W) planes in memory order, a function mapping
    (P, h, w) planes back to a (B, C, h, w) view of that layout, and the layout flag."""
    x = np.asarray(x)
    if channel_major is None:
        channel_major = not x.flags.c_contiguous and x.swapaxes(0, 1).flags.c_contiguous
    B, C = x.shape[:2]
    if channel_major:
        return cm(x).reshape(C * B, *x.shape[2:]), lambda a: nchw(a.reshape(C, B, *a.shape[1:])), True
    return np.ascontiguousarray(x).reshape(B * C, *x.shape[2:]), lambda a: a.reshape(B, C, *a.shape[1:]), False


def max_pool2d_forward_v1(x, kernel_size, stride=None):
    """One parallel pass per (sample, channel) plane; the cache keeps the argmax (int32)."""
    k = _check_int("kernel_size", kernel_size, 1)
    s = k if stride is None else _check_int("stride", stride, 1)
    if x.ndim != 4 or x.shape[2] < k or x.shape[3] < k:
        raise ValueError(f"max_pool2d: x must be (B, C, H, W) with H, W >= kernel_size {k}; got {x.shape}")
    H, W = x.shape[2:]
    Ho, Wo = (H - k) // s + 1, (W - k) // s + 1
    xp, back, layout = _planes(x)
    y = np.empty((xp.shape[0], Ho, Wo), xp.dtype)
    arg = np.empty((xp.shape[0], Ho, Wo), np.int32)
    _pool_fwd(xp, k, s, Ho, Wo, y, arg)
    return back(y), (arg, layout, x.shape, k, s)


def max_pool2d_backward_v1(dy, cache):
    arg, layout, shape, k, s = cache
    dyp, back, _ = _planes(dy, layout)
    dx = np.empty((arg.shape[0],) + tuple(shape[2:]), dyp.dtype)
    _pool_bwd(dyp, arg, k, s, shape[2], shape[3], dx)
    return back(dx)


KERNELS = {
    "conv2d": {1: (conv2d_forward_v1, conv2d_backward_v1), 2: (conv2d_forward_v2, conv2d_backward_v2),
               3: (conv2d_forward_v3, conv2d_backward_v3)},
    "conv_transpose2d": {1: (conv_transpose2d_forward_v1, conv_transpose2d_backward_v1),
                         2: (conv_transpose2d_forward_v2, conv_transpose2d_backward_v2)},
    "max_pool2d": {1: (max_pool2d_forward_v1, max_pool2d_backward_v1)},
}
