"""Convolutions and pooling as forward/backward pairs (reference, float32 or float64).

PyTorch layouts and semantics (cross-correlation, no kernel flip):

    conv2d            x (B, Cin, H, W), w (Cout, Cin, kH, kW), b (Cout,) -> (B, Cout, Ho, Wo)
                      Ho = (H + 2 pad - kH) // stride + 1            (floor mode)
    conv_transpose2d  x (B, Cin, H, W), w (Cin, Cout, kH, kW), b (Cout,) -> (B, Cout, Ho, Wo)
                      Ho = (H - 1) stride - 2 pad + kH               (output_padding = 0)
    max_pool2d        x (B, C, H, W) -> (B, C, Ho, Wo), Ho = (H - k) // stride + 1

The fast path is im2col + GEMM (no Python loop over pixels; a loop over batch chunks of
a few images, of at most CHUNK_BYTES of columns):

    _im2col_chunks  padded, flattened x -> cols (C kH kW, b n) of a chunk of b images: one
                    strided view, each chunk copied once into a reused buffer
    _col2im_add     its adjoint: scatter-add cols back, one add per kernel tap
    y = w cols,   dw = dy cols^T,   dcols = w^T dy         (w as a (Cout, Cin kH kW) matrix)

conv2d is  y = w cols(x);  its input gradient is  col2im(w^T dy).  A transposed convolution
*is* that input-gradient map (conv2d's adjoint, with w read as (Cout', Cin') = (Cin, Cout)),
so conv_transpose2d_forward is col2im(w^T x), its input gradient is conv2d(dy, w), and both
ops share the two kernels. The layout notes above _frame say what keeps them fast; for
stride 1, conv2d_backward gets dx as a convolution of dy instead (cheaper than col2im).

`conv2d_naive_forward` and `conv_transpose2d_naive_forward` are the literal definitions
(a loop over output positions, resp. a scatter loop over input positions); tests check the
fast ops against them, the backwards against finite differences.

Weights and biases are cast to the dtype of x, so outputs and gradients keep x's dtype.
"""
from __future__ import annotations

import numpy as np

from .array_module import array_module, strided_view

__all__ = [
    "conv2d_forward", "conv2d_backward", "conv2d_naive_forward",
    "conv_transpose2d_forward", "conv_transpose2d_backward", "conv_transpose2d_naive_forward",
    "max_pool2d_forward", "max_pool2d_backward",
]


# --- argument checks --------------------------------------------------------------------------
def _check_int(name, value, lo):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lo:
        raise ValueError(f"{name} must be an integer >= {lo}; got {value!r}")
    return int(value)


def _check_conv(op, x, w, b, stride, padding, cin_axis):
    """Shapes and hyper-parameters of conv2d (cin_axis=1) / conv_transpose2d (cin_axis=0)."""
    stride, padding = _check_int("stride", stride, 1), _check_int("padding", padding, 0)
    if x.ndim != 4 or w.ndim != 4:
        raise ValueError(f"{op}: x must be (B, C, H, W) and w 4-D; got x {x.shape}, w {w.shape}")
    if w.shape[cin_axis] != x.shape[1]:
        raise ValueError(f"{op}: x has {x.shape[1]} channels but w {w.shape} expects "
                         f"{w.shape[cin_axis]} (axis {cin_axis})")
    c_out = w.shape[1 - cin_axis]
    if b is not None and tuple(b.shape) != (c_out,):
        raise ValueError(f"{op}: bias must have shape ({c_out},); got {tuple(b.shape)}")
    if min(w.shape) < 1 or min(x.shape) < 1:
        raise ValueError(f"{op}: empty x {x.shape} or w {w.shape}")
    return stride, padding


def _conv_out(op, n, k, stride, padding):
    n_out = (n + 2 * padding - k) // stride + 1
    if n + 2 * padding < k:
        raise ValueError(f"{op}: kernel {k} larger than the padded input {n} + 2*{padding}")
    return n_out


# --- shared kernels -----------------------------------------------------------------------------
# Three layout choices make these fast; all are internal, the ops take and return NCHW.
# 1. Channel-major: inside the kernels an image batch is (C, B, ...), so cols is one 2-D
#    (C kH kW, B n) matrix and each product is one large GEMM per chunk (a good BLAS shape even
#    at 3 x 3 or 1 x 1 pixels, where per-sample GEMMs would be tiny), and dw = dy cols^T too.
# 2. Wide rows: the padded input (C, B, Hp, Wp) is flattened to (C, B, L) and the output
#    is computed on a grid of Ho rows of Wp entries (not Wo): output (r, c), at flat index
#    m = r Wp + c, reads xf[..., i Wp + j + stride m] for tap (i, j). One stride over m
#    instead of two over (r, c) makes each im2col row one long strided run (Ho Wp entries)
#    rather than Ho runs of Wo, which is what makes the copy fast. The Wp - Wo extra
#    columns per row are garbage: cropped from y, and zero in the gradients fed back.
# 3. Batch chunks: cols of the whole batch is large (unet-seed's 10-channel 28 x 28 layers:
#    90 x 107,520 floats, 39 MB), and a fresh array of that size costs a page fault per
#    4 KiB on top of streaming it through memory twice. The kernels build the columns of a
#    few images at a time into one reused buffer of at most CHUNK_BYTES (_im2col_chunks) and
#    multiply each chunk at once. The chunk size trades cache against threads: chunks of
#    512 KiB stay in the L2 cache and make the largest layer's forward 5x faster on one
#    thread, but every product then waits for OpenBLAS's second thread, which on a busy
#    2-core machine costs more than the cache saves (a whole unet-seed step: 32 MiB chunks
#    1.25x faster than 512 KiB ones there). Backward rebuilds the columns from the cached
#    padded input. The products are the same in any chunking.
CHUNK_BYTES = 1 << 25


def _frame(H, W, kH, kW, stride, padding, Ho):
    """Padded width Wp and the flat length L that the wide grid of Ho rows reads: (Wp, L)."""
    Hp, Wp = H + 2 * padding, W + 2 * padding
    return Wp, max(Hp * Wp, (kH - 1) * Wp + kW + stride * (Ho * Wp - 1))


def _flat_pad(x, padding, L):
    """x (B, C, H, W) -> zero-padded, channel-major, flattened (C, B, L) (zero tail)."""
    B, C, H, W = x.shape
    Hp, Wp = H + 2 * padding, W + 2 * padding
    xf = array_module(x).zeros((C, B, L), dtype=x.dtype)
    grid = xf[:, :, :Hp * Wp].reshape(C, B, Hp, Wp)
    grid[:, :, padding:padding + H, padding:padding + W] = x.transpose(1, 0, 2, 3)
    return xf


def _unflat_crop(xf, Wp, padding, H, W):
    """Inverse of _flat_pad on the gradient side: (C, B, L) -> the interior (B, C, H, W)."""
    C, B = xf.shape[:2]
    grid = xf[:, :, :(H + 2 * padding) * Wp].reshape(C, B, H + 2 * padding, Wp)
    return array_module(xf).ascontiguousarray(grid[:, :, padding:padding + H, padding:padding + W].transpose(1, 0, 2, 3))


def _widen(y, Wp):
    """(B, C, Ho, Wo) -> (C, B, Ho Wp), zero in the garbage columns Wo..Wp-1."""
    B, C, Ho, Wo = y.shape
    out = array_module(y).zeros((C, B, Ho, Wp), dtype=y.dtype)
    out[:, :, :, :Wo] = y.transpose(1, 0, 2, 3)
    return out.reshape(C, B, Ho * Wp)


def _narrow(yw, Wp, Wo):
    """(C, B, Ho Wp) -> (B, C, Ho, Wo): drop the garbage columns."""
    C, B, n = yw.shape
    return array_module(yw).ascontiguousarray(yw.reshape(C, B, n // Wp, Wp)[:, :, :, :Wo].transpose(1, 0, 2, 3))


def _batch_chunks(xp, B, bytes_per_image, whole=False):
    """Slices of the batch whose columns take about CHUNK_BYTES each; one slice if `whole`,
    and on a GPU, where one large launch beats many small ones."""
    step = B if whole or xp is not np else max(1, CHUNK_BYTES // bytes_per_image)
    return [slice(b, min(b + step, B)) for b in range(0, B, step)]


def _rows(a, sl):
    """The columns of batch slice `sl` of a (R, B, n) array, as an (R, b n) matrix (a view)."""
    return a[:, sl].reshape(a.shape[0], -1)


def _im2col_chunks(xf, Wp, kH, kW, stride, n, whole=False):
    """xf (C, B, L) -> (batch slice, cols of those images (C kH kW, b n)), chunk by chunk:

        cols[(c,i,j), (b,m)] = xf[c, b, i Wp + j + stride m],

    rows ordered (c, i, j) like w.reshape(Cout, -1). Each chunk is copied from one strided
    view into one buffer, reused: a chunk is valid until the next one is produced. `whole`:
    one chunk, the whole batch."""
    C, B = xf.shape[:2]
    xp, K = array_module(xf), C * kH * kW
    sC, sB, sL = xf.strides
    win = strided_view(xp, xf, (C, kH, kW, B, n), (sC, Wp * sL, sL, sB, stride * sL))
    chunks = _batch_chunks(xp, B, K * n * xf.itemsize, whole)
    buf = xp.empty(K * (chunks[0].stop - chunks[0].start) * n, dtype=xf.dtype)
    for sl in chunks:
        cols = buf[:K * (sl.stop - sl.start) * n].reshape(C, kH, kW, sl.stop - sl.start, n)
        xp.copyto(cols, win[:, :, :, sl])
        yield sl, cols.reshape(K, -1)


def _phase_frame(xp, C, B, L, stride, dtype):
    """Zeros for col2im's sums: the flat frame (C, B, L), stored phase-major as
    (C, B, stride, ceil(L / stride)), frame entry d at [..., d % stride, d // stride]. A tap's
    run of the frame, every stride-th entry, is then one contiguous run of one phase (strided
    adds are 4x slower in NumPy)."""
    return xp.zeros((C, B, stride, -(-L // stride)), dtype=dtype)


def _col2im_add(out, cols, Wp, kH, kW, stride):
    """Adjoint of _im2col_chunks: cols (C kH kW, b n) summed into a phase-major frame out
    (C, b, stride, Ls) (_phase_frame), one contiguous add per tap: frame entry o + stride m
    (o = i Wp + j) is out[:, :, o % stride, o // stride + m]."""
    C, b = out.shape[:2]
    n = cols.shape[1] // b
    c5 = cols.reshape(C, kH, kW, b, n)
    for i in range(kH):
        for j in range(kW):
            q, r = divmod(i * Wp + j, stride)
            out[:, :, r, q:q + n] += c5[:, i, j]
    return out


def _interleave(out):
    """Phase-major (C, B, stride, Ls) -> the flat frame (C, B, stride Ls) (a copy if stride > 1)."""
    C, B, stride, Ls = out.shape
    return out.transpose(0, 1, 3, 2).reshape(C, B, stride * Ls)


def _bias(b, dtype):
    return None if b is None else array_module(b).asarray(b).astype(dtype, copy=False)


# --- conv2d -------------------------------------------------------------------------------------
def conv2d_forward(x, w, b, stride=1, padding=0):
    """PyTorch Conv2d. x (B, Cin, H, W), w (Cout, Cin, kH, kW), b (Cout,) or None -> y (B, Cout, Ho, Wo)."""
    stride, padding = _check_conv("conv2d", x, w, b, stride, padding, cin_axis=1)
    B, Cin, H, W = x.shape
    Cout, _, kH, kW = w.shape
    Ho, Wo = _conv_out("conv2d", H, kH, stride, padding), _conv_out("conv2d", W, kW, stride, padding)
    xp = array_module(x)
    w, b = w.astype(x.dtype, copy=False), _bias(b, x.dtype)
    Wp, L = _frame(H, W, kH, kW, stride, padding, Ho)
    xf = _flat_pad(x, padding, L)                                            # (Cin, B, L)
    wm = w.reshape(Cout, -1)                                                 # (Cout, Cin kH kW)
    yw = xp.empty((Cout, B, Ho * Wp), dtype=x.dtype)
    for sl, cols in _im2col_chunks(xf, Wp, kH, kW, stride, Ho * Wp):        # (Cin kH kW, b Ho Wp)
        y_sl = _rows(yw, sl)
        xp.matmul(wm, cols, out=y_sl)
        if b is not None:
            y_sl += b[:, None]
    return _narrow(yw, Wp, Wo), (xf, w, x.shape, stride, padding, b is not None)


def conv2d_backward(dy, cache):
    """dy (B, Cout, Ho, Wo) -> dx (B, Cin, H, W), dw (Cout, Cin, kH, kW), db (Cout,) or None."""
    xf, w, (B, Cin, H, W), stride, padding, has_b = cache
    Cout, _, kH, kW = w.shape
    xp = array_module(dy)
    Ho = dy.shape[2]
    dy = xp.asarray(dy, dtype=w.dtype)
    Wp, L = _frame(H, W, kH, kW, stride, padding, Ho)
    dyw = _widen(dy, Wp)                                                     # (Cout, B, Ho Wp)
    # dw = dy cols^T as one product over the whole batch, cols (not dy) on the left: with
    # 2 threads on a busy machine OpenBLAS takes 10-60x longer on the other operand order,
    # or on one small product per chunk (each waits for the second thread).
    _, cols = next(_im2col_chunks(xf, Wp, kH, kW, stride, Ho * Wp, whole=True))
    dw = (cols @ dyw.reshape(Cout, -1).T).T                                  # (Cout, Cin kH kW)
    del cols
    if stride == 1 and kH == kW and padding <= kH - 1:
        # Stride 1: the input gradient is itself a convolution, dx = conv2d(dy, w flipped in
        # space with Cin, Cout swapped, padding k-1-p). One im2col of dy moves far less memory
        # than kH kW scatter-adds; tests check both branches against finite differences.
        w_adj = w.transpose(1, 0, 2, 3)[:, :, ::-1, ::-1]                   # (Cin, Cout, kH, kW)
        dx, _ = conv2d_forward(dy, w_adj, None, 1, kH - 1 - padding)
    else:
        dxf = _phase_frame(xp, Cin, B, L, stride, w.dtype)
        wt = w.reshape(Cout, -1).T                                           # (Cin kH kW, Cout)
        for sl in _batch_chunks(xp, B, wt.shape[0] * Ho * Wp * w.itemsize):
            _col2im_add(dxf[:, sl], wt @ _rows(dyw, sl), Wp, kH, kW, stride)
        dx = _unflat_crop(_interleave(dxf), Wp, padding, H, W)
    db = dy.sum(axis=(0, 2, 3)) if has_b else None
    return dx, dw.reshape(w.shape), db


def conv2d_naive_forward(x, w, b, stride=1, padding=0):
    """Literal definition, one output pixel at a time: y[:, o, r, c] = sum x_window * w[o] + b[o].

    The test oracle for conv2d_forward. Returns (y, None): there is no naive backward.
    """
    stride, padding = _check_conv("conv2d", x, w, b, stride, padding, cin_axis=1)
    B, _, H, W = x.shape
    Cout, _, kH, kW = w.shape
    Ho, Wo = _conv_out("conv2d", H, kH, stride, padding), _conv_out("conv2d", W, kW, stride, padding)
    x_pad = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    w = w.astype(x.dtype, copy=False)
    y = np.zeros((B, Cout, Ho, Wo), dtype=x.dtype)
    for r in range(Ho):
        for c in range(Wo):
            patch = x_pad[:, :, r * stride:r * stride + kH, c * stride:c * stride + kW]   # (B, Cin, kH, kW)
            y[:, :, r, c] = np.tensordot(patch, w, axes=([1, 2, 3], [1, 2, 3]))
    if b is not None:
        y += _bias(b, x.dtype)[:, None, None]
    return y, None


# --- conv_transpose2d ---------------------------------------------------------------------------
def _convt_out(H, kH, stride, padding):
    n_out = (H - 1) * stride - 2 * padding + kH
    if n_out < 1:
        raise ValueError(f"conv_transpose2d: output size (H-1)*stride - 2*padding + k = "
                         f"({H}-1)*{stride} - 2*{padding} + {kH} = {n_out} < 1")
    return n_out


def conv_transpose2d_forward(x, w, b, stride=1, padding=0):
    """PyTorch ConvTranspose2d (output_padding=0): the adjoint of conv2d with the same w.

    x (B, Cin, H, W), w (Cin, Cout, kH, kW), b (Cout,) or None -> y (B, Cout, Ho, Wo) with
    Ho = (H-1) stride - 2 pad + kH. Each input pixel scatters x[b, :, r, c] . w into the
    kH x kW patch at (stride r, stride c) of the full output ((H-1) stride + kH rows), and
    `padding` crops that on each side. Computed as col2im(w^T x): conv2d's input-gradient map
    for a conv2d from the full output down to x.
    """
    stride, padding = _check_conv("conv_transpose2d", x, w, b, stride, padding, cin_axis=0)
    B, Cin, H, W = x.shape
    _, Cout, kH, kW = w.shape
    Ho, Wo = _convt_out(H, kH, stride, padding), _convt_out(W, kW, stride, padding)
    xp = array_module(x)
    w, b = w.astype(x.dtype, copy=False), _bias(b, x.dtype)
    Wf, L = _frame(Ho, Wo, kH, kW, stride, padding, H)                      # Wf: full output width
    xw = _widen(xp.asarray(x), Wf)                                           # (Cin, B, H Wf)
    wt = w.reshape(Cin, -1).T                                                # (Cout kH kW, Cin)
    full = _phase_frame(xp, Cout, B, L, stride, x.dtype)
    for sl in _batch_chunks(xp, B, wt.shape[0] * H * Wf * x.itemsize):      # cols (Cout kH kW, b H Wf)
        _col2im_add(full[:, sl], wt @ _rows(xw, sl), Wf, kH, kW, stride)
    y = _unflat_crop(_interleave(full), Wf, padding, Ho, Wo)
    if b is not None:
        y += b[:, None, None]
    return y, (xw, w, (H, W), stride, padding, b is not None)


def conv_transpose2d_backward(dy, cache):
    """dy (B, Cout, Ho, Wo) -> dx (B, Cin, H, W), dw (Cin, Cout, kH, kW), db (Cout,) or None.

    dx is conv2d(dy, w) with the same stride and padding (the adjoint of the adjoint).
    """
    xw, w, (H, W), stride, padding, has_b = cache
    Cin, _, kH, kW = w.shape
    xp = array_module(dy)
    dy = xp.asarray(dy, dtype=w.dtype)
    B, _, Ho, Wo = dy.shape
    Wf, L = _frame(Ho, Wo, kH, kW, stride, padding, H)
    wm = w.reshape(Cin, -1)                                                  # (Cin, Cout kH kW)
    # one chunk: dw in one product, dcols on the left (see conv2d_backward)
    _, dcols = next(_im2col_chunks(_flat_pad(dy, padding, L), Wf, kH, kW, stride, H * Wf, whole=True))
    dxw = (wm @ dcols).reshape(Cin, B, H * Wf)                               # dcols (Cout kH kW, B H Wf)
    dw = (dcols @ xw.reshape(Cin, -1).T).T
    db = dy.sum(axis=(0, 2, 3)) if has_b else None
    return _narrow(dxw, Wf, W), dw.reshape(w.shape), db


def conv_transpose2d_naive_forward(x, w, b, stride=1, padding=0):
    """Literal definition, one input pixel at a time: scatter x[:, :, r, c] . w into the
    output patch at (stride r, stride c), then crop `padding`. Returns (y, None)."""
    stride, padding = _check_conv("conv_transpose2d", x, w, b, stride, padding, cin_axis=0)
    B, _, H, W = x.shape
    _, Cout, kH, kW = w.shape
    Ho, Wo = _convt_out(H, kH, stride, padding), _convt_out(W, kW, stride, padding)
    w = w.astype(x.dtype, copy=False)
    full = np.zeros((B, Cout, (H - 1) * stride + kH, (W - 1) * stride + kW), dtype=x.dtype)
    for r in range(H):
        for c in range(W):
            full[:, :, r * stride:r * stride + kH, c * stride:c * stride + kW] += \
                np.tensordot(x[:, :, r, c], w, axes=([1], [0]))           # (B, Cout, kH, kW)
    y = full[:, :, padding:padding + Ho, padding:padding + Wo].copy()
    if b is not None:
        y += _bias(b, x.dtype)[:, None, None]
    return y, None


# --- max_pool2d ---------------------------------------------------------------------------------
def max_pool2d_forward(x, kernel_size, stride=None):
    """PyTorch MaxPool2d(kernel_size, stride), no padding, floor mode.

    x (B, C, H, W) -> y (B, C, Ho, Wo), Ho = (H - k) // stride + 1; stride defaults to k.
    Ties: the gradient goes to one position, the first maximum in row-major window order.
    """
    k = _check_int("kernel_size", kernel_size, 1)
    s = k if stride is None else _check_int("stride", stride, 1)
    if x.ndim != 4 or x.shape[2] < k or x.shape[3] < k:
        raise ValueError(f"max_pool2d: x must be (B, C, H, W) with H, W >= kernel_size {k}; got {x.shape}")
    B, C, H, W = x.shape
    Ho, Wo = (H - k) // s + 1, (W - k) // s + 1
    xp = array_module(x)
    sB, sC, sH, sW = x.strides
    win = strided_view(xp, x, (B, C, Ho, Wo, k, k), (sB, sC, s * sH, s * sW, sH, sW))
    win = win.reshape(B, C, Ho, Wo, k * k)                             # a copy
    arg = win.argmax(axis=-1)                                           # first max wins ties
    y = xp.take_along_axis(win, arg[..., None], axis=-1)[..., 0]
    return y, (arg, x.shape, k, s)


def max_pool2d_backward(dy, cache):
    """dy (B, C, Ho, Wo) -> dx (B, C, H, W): dy routed to the arg-max of each window."""
    arg, shape, k, s = cache
    Ho, Wo = arg.shape[2:]
    xp = array_module(dy)
    dx = xp.zeros(shape, dtype=dy.dtype)
    for t in range(k * k):                                              # overlapping windows add up
        i, j = divmod(t, k)
        dx[:, :, i:i + s * (Ho - 1) + 1:s, j:j + s * (Wo - 1) + 1:s] += xp.where(arg == t, dy, 0)
    return dx
