"""conv2d version 4 (numba, CPU): wide-row im2col per cache-sized chunk, and a dense
matrix for tiny images. Twin of refdiff/nn/conv.py's conv2d; agrees with it within
refdiff_cuda.testing.TOL (only the order of the sums differs).

Why a version 4 (measured on unet-seed's layers, batch 128, 2 cores): version 3 spent most
of its time in im2col, not in the GEMM. Its im2col copies one output row (Wo <= 28
floats) at a time; on 7 x 7 and 3 x 3 images that is 7 or 3 floats per copy, and the
40- and 80-channel layers ran at 20-50 GFLOP/s where the same GEMM alone reaches 150+.

Path A, "wide rows" (stride 1, padding <= min(kH, kW) - 1, so dx is again such a conv):
the input is zero-padded once into planes of Hp x Wp (channel-major, all samples end to
end). In that frame, tap (i, j) of output row r, column q reads padded pixel
(r + i, q + j); if the output row is also Wp wide (columns q >= Wo are garbage, dropped
later), the im2col row of tap (c, i, j) for one sample is ONE contiguous run of Ho Wp
floats starting at i Wp + j: a memcpy, whatever the image size. The GEMM then does
Wp / Wo more work than needed (1.07x at 28 x 28, 1.29x at 7 x 7) and a last pass copies
the valid columns out, adding the bias. As in version 3, one parallel loop over chunks of
`cb` samples: each thread builds its chunk's columns in its own L2-sized buffer and calls
a single-threaded BLAS GEMM on it (_blas.gemm). The backward recomputes the columns per
chunk for dw (dy widened with zeros in the garbage columns, so they add nothing), and gets
dx as the same forward applied to dy padded by k - 1 - p, with w flipped and Cin <-> Cout.

Path B, "dense" (any stride and padding, images with H W <= kH kW, e.g. unet-seed's
3 x 3 and 1 x 1 stages): a conv is a linear map from the Cin H W inputs of a sample to its
Cout Ho Wo outputs. Written as one matrix Wd (Cin H W, Cout Ho Wo) it costs
2 B Cin H W Cout Ho Wo flops: no more than im2col's 2 B Cin kH kW Cout Ho Wo when
H W <= kH kW, and it is a single large GEMM on the NCHW batch, no im2col at all:
y = x Wd, dx = dy Wd^T, dWd = x^T dy, and dw folds dWd back onto the taps.
Other convs use version 2. A NaN in a dense-path result is recomputed by version 1 (see
_v1_redo: NaN and inf then come out as the reference's).
"""
from __future__ import annotations

import numpy as np
from numba import get_num_threads, get_thread_id, njit, prange

from refdiff.nn.conv import _check_conv, _conv_out

from ._blas import gemm, matmul, matmul_t
from ._layout import cm, native, nchw
from .conv import conv2d_backward_v1, conv2d_backward_v2, conv2d_forward_v1, conv2d_forward_v2

_JIT = dict(cache=True, fastmath=False)
_L2_FLOATS = 32768           # per-thread column buffer cap (128 KB of float32); see _chunk


# ================================ path A: wide rows ============================================
@njit(parallel=True, **_JIT)
def _pad_planes(x, ph, pw, slack):
    """x (C, B, H, W) -> (C, B Hp Wp + slack) zero-padded planes, Hp = H + 2 ph, Wp = W + 2 pw."""
    C, B, H, W = x.shape
    Hp, Wp = H + 2 * ph, W + 2 * pw
    xp = np.zeros((C, B * Hp * Wp + slack), x.dtype)
    for task in prange(C * B):
        c, b = task // B, task % B
        base = b * Hp * Wp + ph * Wp + pw
        for r in range(H):
            xp[c, base + r * Wp:base + r * Wp + W] = x[c, b, r]
    return xp


@njit(**_JIT)
def _wide_cols(xp, B, HpWp, Wp, kH, kW, nw, b0, nb, cols):
    """Columns of samples b0 .. b0+nb-1: cols[(c, i, j), bb nw + m] = xp[c, (b0+bb) HpWp + i Wp + j + m]."""
    C = xp.shape[0]
    for c in range(C):
        for i in range(kH):
            for j in range(kW):
                row = (c * kH + i) * kW + j
                for bb in range(nb):
                    s = (b0 + bb) * HpWp + i * Wp + j
                    cols[row, bb * nw:(bb + 1) * nw] = xp[c, s:s + nw]


@njit(parallel=True, cache=True)
def _wide_fwd(xp, B, Hp, Wp, kH, kW, Ho, Wo, w2, bias, has_b, cb, Y, cols_s, yw_s):
    """Y (Cout, B, Ho, Wo) = conv of the padded planes xp with w2 (Cout, C kH kW) (+ bias)."""
    Cout, K = w2.shape
    nw = Ho * Wp
    for ch in prange((B + cb - 1) // cb):
        tid = get_thread_id()
        b0 = ch * cb
        nb = min(cb, B - b0)
        cols, yw = cols_s[tid], yw_s[tid]
        _wide_cols(xp, B, Hp * Wp, Wp, kH, kW, nw, b0, nb, cols)
        gemm(Cout, nb * nw, K, w2.reshape(-1), 0, K, cols.reshape(-1), 0, cb * nw, False,
             yw.reshape(-1), 0, cb * nw, 0.0)
        _narrow(yw, b0, nb, Wp, nw, bias, has_b, Y)


@njit(**_JIT)
def _narrow(yw, b0, nb, Wp, sample_stride, bias, has_b, Y):
    """Y[co, b0 + bb, r, q] = yw[co, bb sample_stride + r Wp + q] (+ bias[co]) for q < Wo: the
    valid columns of each wide row (the adjoint of _widen, plus the bias)."""
    Cout, _, Ho, Wo = Y.shape
    for co in range(Cout):
        bc = bias[co] if has_b else 0.0
        for bb in range(nb):
            for r in range(Ho):
                o = bb * sample_stride + r * Wp
                for q in range(Wo):
                    Y[co, b0 + bb, r, q] = yw[co, o + q] + bc


@njit(**_JIT)
def _widen(dyc, b0, nb, Wp, sample_stride, dyw):
    """dyw[co, bb sample_stride + r Wp + q] = dy[co, b0 + bb, r, q] for q < Wo, 0 for Wo <= q < Wp:
    dy in the wide frame, zero in the garbage columns (so they add nothing to dw)."""
    Cout, _, Ho, Wo = dyc.shape
    for co in range(Cout):
        for bb in range(nb):
            for r in range(Ho):
                o = bb * sample_stride + r * Wp
                for q in range(Wo):
                    dyw[co, o + q] = dyc[co, b0 + bb, r, q]
                for q in range(Wo, Wp):
                    dyw[co, o + q] = 0.0


@njit(parallel=True, cache=True)
def _wide_dw(xp, dyc, B, Hp, Wp, kH, kW, cb, dw_part, cols_s, dyw_s):
    """dw_part[thread] += dy_wide cols^T over that thread's chunks (dy_wide: 0 in garbage columns)."""
    Cout, _, Ho, Wo = dyc.shape
    K = dw_part.shape[2]
    nw = Ho * Wp
    for ch in prange((B + cb - 1) // cb):
        tid = get_thread_id()
        b0 = ch * cb
        nb = min(cb, B - b0)
        cols, dyw = cols_s[tid], dyw_s[tid]
        _wide_cols(xp, B, Hp * Wp, Wp, kH, kW, nw, b0, nb, cols)
        _widen(dyc, b0, nb, Wp, nw, dyw)
        gemm(Cout, K, nb * nw, dyw.reshape(-1), 0, cb * nw, cols.reshape(-1), 0, cb * nw, True,
             dw_part[tid].reshape(-1), 0, K, 1.0)


def _chunk(K, nw, B):
    """Samples per chunk. Measured on unet-seed's 3 x 3 layers (batch 128, 2 threads): chunks of
    ONE sample were fastest at every size (28 x 28 / 10 ch: 2.8 ms vs 4.6 ms with 1 MB chunks;
    7 x 7 / 40 ch: 2.0 vs 2.5 ms), so only images whose columns fill under 128 KB share a chunk."""
    return max(1, min(B, _L2_FLOATS // max(1, K * nw)))


def _wide_conv(xc, w, b, ph, pw):
    """Stride-1 conv of channel-major xc (C, B, H, W) with w (Cout, C, kH, kW), paddings ph, pw."""
    C, B, H, W = xc.shape
    Cout, _, kH, kW = w.shape
    Hp, Wp = H + 2 * ph, W + 2 * pw
    Ho, Wo = Hp - kH + 1, Wp - kW + 1
    xp = _pad_planes(xc, ph, pw, kW - 1)
    w2 = np.ascontiguousarray(w.reshape(Cout, -1))
    K, nw = w2.shape[1], Ho * Wp
    cb = _chunk(K, nw, B)
    T, dt = get_num_threads(), xc.dtype
    Y = np.empty((Cout, B, Ho, Wo), dt)
    bias = np.zeros(Cout, dt) if b is None else np.ascontiguousarray(b, dtype=dt)
    _wide_fwd(xp, B, Hp, Wp, kH, kW, Ho, Wo, w2, bias, b is not None, cb, Y,
              np.empty((T, K, cb * nw), dt), np.empty((T, Cout, cb * nw), dt))
    return Y, xp


def _wide_applies(stride, padding, kH, kW):
    return stride == 1 and padding <= min(kH, kW) - 1


# ================================ path B: dense matrix =========================================
@njit(parallel=True, **_JIT)
def _dense_map(w, wd, H, W, Ho, Wo, stride, pad, fold):
    """The one correspondence between taps and dense-matrix entries, both ways:
    wd[(ci, ri, qi), (co, ro, qo)] <-> w[co, ci, ri - ro s + p, qi - qo s + p] (where that tap
    exists). fold=False writes w's entries into wd (the other entries stay 0); fold=True, the
    adjoint, adds each wd entry into its tap of w. Parallel over ci: each owns its rows of wd
    and its slice w[:, ci]."""
    Cout, Cin, kH, kW = w.shape
    Pi, Po = H * W, Ho * Wo
    for ci in prange(Cin):
        for ro in range(Ho):
            for qo in range(Wo):
                for i in range(kH):
                    ri = ro * stride + i - pad
                    if ri < 0 or ri >= H:
                        continue
                    for j in range(kW):
                        qi = qo * stride + j - pad
                        if qi < 0 or qi >= W:
                            continue
                        row = ci * Pi + ri * W + qi
                        for co in range(Cout):
                            if fold:
                                w[co, ci, i, j] += wd[row, co * Po + ro * Wo + qo]
                            else:
                                wd[row, co * Po + ro * Wo + qo] = w[co, ci, i, j]


def _dense_weight(w, H, W, Ho, Wo, stride, pad):
    """WdT (Cin H W, Cout Ho Wo) of the conv with weights w (0 where no tap reaches)."""
    Cout, Cin = w.shape[:2]
    wd = np.zeros((Cin * H * W, Cout * Ho * Wo), w.dtype)
    _dense_map(w, wd, H, W, Ho, Wo, stride, pad, False)
    return wd


def _dense_fold(dwd, Cout, Cin, kH, kW, H, W, Ho, Wo, stride, pad):
    """Adjoint of _dense_weight: dw[co, ci, i, j] = sum of dWd over the entries tap (i, j) fills."""
    dw = np.zeros((Cout, Cin, kH, kW), dwd.dtype)
    _dense_map(dw, dwd, H, W, Ho, Wo, stride, pad, True)
    return dw


def _dense_applies(H, W, kH, kW):
    return H * W <= kH * kW


# ================================ the op pair ==================================================
def _v1_redo(x, w, b, stride, padding, dy=None):
    """Version 1's result (forward, or backward when dy is given) for the same inputs.

    Fast paths multiply zeros the reference does not (the dense matrix's structural zeros, the
    garbage columns of their wide frames, inserted zeros), and the reference multiplies some
    that they do not (its own frame's garbage columns). With an inf among the inputs, 0 x inf
    then puts NaN in different places. A NaN in a fast result sends the op here: version 1 is
    the literal port, with the reference's frame, so NaN and inf come out where the
    reference's do. Finite inputs never take this path."""
    return redo_with((conv2d_forward_v1, conv2d_backward_v1), x, w, b, stride, padding, dy)


def redo_with(pair, x, w, b, stride, padding, dy=None):
    """pair's forward (tagged "v1" for the backward), or its backward for dy, on these inputs."""
    y, cache = pair[0](x, w, b, stride, padding)
    return (y, ("v1", cache)) if dy is None else pair[1](dy, cache)


def conv2d_forward_v4(x, w, b, stride=1, padding=0):
    stride, padding = _check_conv("conv2d", x, w, b, stride, padding, cin_axis=1)
    x = native(x)
    dt = x.dtype
    B, Cin, H, W = x.shape
    Cout, _, kH, kW = w.shape
    Ho, Wo = _conv_out("conv2d", H, kH, stride, padding), _conv_out("conv2d", W, kW, stride, padding)
    w = np.asarray(w, dtype=dt)
    if _dense_applies(H, W, kH, kW):
        X = np.ascontiguousarray(x).reshape(B, Cin * H * W)                # NCHW rows
        wdT = _dense_weight(w, H, W, Ho, Wo, stride, padding)
        y = matmul(X, wdT).reshape(B, Cout, Ho, Wo)
        if b is not None:
            y += np.asarray(b, dtype=dt).reshape(1, Cout, 1, 1)
        if np.isnan(y).any():
            return _v1_redo(x, w, b, stride, padding)
        return y, ("dense", (X, wdT, w, (H, W, Ho, Wo), stride, padding, b))
    if _wide_applies(stride, padding, kH, kW):
        Y, xp = _wide_conv(cm(x), w, b, padding, padding)
        return nchw(Y), ("wide", (xp, w, (B, Cin, H, W), padding, b is not None))
    y, cache = conv2d_forward_v2(x, w, b, stride, padding)
    return y, ("v2", cache)


def conv2d_backward_v4(dy, cache):
    kind, cache = cache
    if kind == "v2":
        return conv2d_backward_v2(dy, cache)
    if kind == "v1":
        return conv2d_backward_v1(dy, cache)
    if kind == "dense":
        X, wdT, w, (H, W, Ho, Wo), stride, padding, b = cache
        Cout, Cin, kH, kW = w.shape
        B = X.shape[0]
        dY = np.ascontiguousarray(dy, dtype=X.dtype).reshape(B, Cout * Ho * Wo)
        dx = matmul_t(dY, False, wdT, True).reshape(B, Cin, H, W)       # dY Wd^T, no transposed copy
        dwd = matmul_t(X, True, dY, False)                               # X^T dY: (Cin H W, Cout Ho Wo)
        dw = _dense_fold(dwd, Cout, Cin, kH, kW, H, W, Ho, Wo, stride, padding)
        if np.isnan(dx).any() or np.isnan(dw).any():
            return _v1_redo(X.reshape(B, Cin, H, W), w, b, stride, padding, dy)
        db = dY.reshape(B, Cout, Ho * Wo).sum(axis=(0, 2)) if b is not None else None
        return dx, dw, db
    xp, w, (B, Cin, H, W), padding, has_b = cache
    Cout, _, kH, kW = w.shape
    dt = xp.dtype
    dyc = cm(dy, dt)                                                     # (Cout, B, Ho, Wo)
    Ho = dyc.shape[2]
    Hp, Wp = H + 2 * padding, W + 2 * padding
    K, nw = Cin * kH * kW, Ho * Wp
    cb = _chunk(K, nw, B)
    T = get_num_threads()
    dw_part = np.zeros((T, Cout, K), dt)
    _wide_dw(xp, dyc, B, Hp, Wp, kH, kW, cb, dw_part,
             np.empty((T, K, cb * nw), dt), np.empty((T, Cout, cb * nw), dt))
    w_adj = np.ascontiguousarray(w.transpose(1, 0, 2, 3)[:, :, ::-1, ::-1])   # (Cin, Cout, kH, kW)
    dX, _ = _wide_conv(dyc, w_adj, None, kH - 1 - padding, kW - 1 - padding)
    db = dyc.sum(axis=(1, 2, 3)) if has_b else None
    return nchw(dX), dw_part.sum(axis=0).reshape(w.shape), db
