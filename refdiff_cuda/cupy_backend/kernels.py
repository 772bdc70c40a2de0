"""Version 2 of the cupy backend: fused CUDA C kernels (cupy.RawKernel) + cuBLAS.

Same algebra as the numba-cuda kernels (see refdiff_cuda/numba_cuda/*.py), as CUDA C:
one thread per output entry, gather instead of scatter (no atomics: deterministic), sums
in double where the reference reduces, the reference's order of operations elsewhere.
Each source is compiled for float and double (T substituted), on first use.
"""
from __future__ import annotations

import functools

import cupy as cp
import numpy as np

from refdiff.nn.conv import _check_conv, _conv_out, _convt_out
from refdiff.nn.norm import _check

from refdiff.nn.steps import ddpm_coeffs, em_coeffs

TPB, RB = 256, 256
_SRC = r"""
extern "C" __global__ void silu_fwd(const T* x, T* y, T* s, long long n) {
    long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    if (i < n) { T si = (T)0.5 * ((T)1 + tanh((T)0.5 * x[i])); s[i] = si; y[i] = x[i] * si; }
}
extern "C" __global__ void silu_bwd(const T* dy, const T* x, const T* s, T* dx, long long n) {
    long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    if (i < n) dx[i] = dy[i] * (s[i] * ((T)1 + x[i] * ((T)1 - s[i])));
}
extern "C" __global__ void adam(T* p, const T* g, T* m, T* v, long long n, T b1, T omb1, T b2, T omb2,
                                T decay, T lr_bc1, double sqrt_bc2, double eps) {
    long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    if (i < n) {            /* NumPy's order and precision: see numba_cpu/functional.py _adam_body */
        T pi = p[i] * decay; T mi = m[i] * b1 + omb1 * g[i]; T vi = v[i] * b2 + (omb2 * g[i]) * g[i];
        m[i] = mi; v[i] = vi;
        double den = (double)sqrt(vi) / sqrt_bc2 + eps;
        p[i] = (T)((double)pi - (double)(lr_bc1 * mi) / den);
    }
}
extern "C" __global__ void ddpm(const T* x, const T* e, const T* z, T* out, long long n, T ce, T cx, T cz, int has_z) {
    long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    if (i < n) { T o = (x[i] - ce * e[i]) * cx; if (has_z) o = o + cz * z[i]; out[i] = o; }
}
extern "C" __global__ void em(const T* x, const T* s, const T* z, T* out, long long n, T adt, T g2dt, T cz, int has_z) {
    long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    if (i < n) { T o = x[i] + adt * x[i] + g2dt * s[i]; if (has_z) o = o + cz * z[i]; out[i] = o; }
}
extern "C" __global__ void im2col(const T* x, T* cols, int C, int B, int H, int W, int kH, int kW,
                                  int s, int p, int Ho, int Wo, int ones_row) {
    long long n = (long long)Ho * Wo, K = (long long)C * kH * kW;
    long long idx = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    if (idx >= (K + ones_row) * B * n) return;
    long long row = idx / (B * n), m = idx % (B * n);
    if (row == K) { cols[idx] = (T)1; return; }
    int c = row / (kH * kW), i = (row / kW) % kH, j = row % kW;
    int b = m / n, r = (m % n) / Wo, q = m % Wo;
    int ii = r * s + i - p, jj = q * s + j - p;
    cols[idx] = (ii >= 0 && ii < H && jj >= 0 && jj < W) ? x[(((long long)b * C + c) * H + ii) * W + jj] : (T)0;
}
extern "C" __global__ void col2im(const T* cols, T* out, const T* bias, int has_b, int C, int B, int H, int W,
                                  int kH, int kW, int s, int p, int Ho, int Wo) {
    long long idx = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    if (idx >= (long long)B * C * H * W) return;
    int b = idx / ((long long)C * H * W), c = (idx / ((long long)H * W)) % C, ii = (idx / W) % H, jj = idx % W;
    long long n = (long long)Ho * Wo;
    T acc = (T)0;
    for (int i = 0; i < kH; i++) {
        int rr = ii + p - i;
        if (rr < 0 || rr % s != 0 || rr / s >= Ho) continue;
        for (int j = 0; j < kW; j++) {
            int qq = jj + p - j;
            if (qq < 0 || qq % s != 0 || qq / s >= Wo) continue;
            acc += cols[((long long)(c * kH + i) * kW + j) * B * n + b * n + (rr / s) * Wo + qq / s];
        }
    }
    if (has_b) acc += bias[c];
    out[idx] = acc;
}
extern "C" __global__ void cm_to_nchw(const T* Y, T* y, int C, int B, long long n) {
    long long idx = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    if (idx >= (long long)C * B * n) return;
    long long b = idx / (C * n), c = (idx / n) % C, m = idx % n;
    y[idx] = Y[c * B * n + b * n + m];
}
extern "C" __global__ void gn_stats(const T* x, T* mean, T* rstd, long long n, T eps) {
    __shared__ double sh[RB];
    long long t = blockIdx.x; int tid = threadIdx.x;
    double acc = 0;
    for (long long k = tid; k < n; k += RB) acc += x[t * n + k];
    sh[tid] = acc; __syncthreads();
    for (int h = RB / 2; h > 0; h /= 2) { if (tid < h) sh[tid] += sh[tid + h]; __syncthreads(); }
    T mu = (T)(sh[0] / n);
    __syncthreads();
    acc = 0;
    for (long long k = tid; k < n; k += RB) { T d = x[t * n + k] - mu; acc += (double)(d * d); }
    sh[tid] = acc; __syncthreads();
    for (int h = RB / 2; h > 0; h /= 2) { if (tid < h) sh[tid] += sh[tid + h]; __syncthreads(); }
    if (tid == 0) { mean[t] = mu; T var = (T)(sh[0] / n); rstd[t] = (T)1 / sqrt(var + eps); }
}
__device__ T dz_of(T d, T xh, T ga, T be, int silu) {
    if (!silu) return d;
    T z = xh * ga + be, sz = (T)0.5 * ((T)1 + tanh((T)0.5 * z));
    return d * (sz * ((T)1 + z * ((T)1 - sz)));
}
extern "C" __global__ void gn_apply(const T* x, const T* mean, const T* rstd, const T* gamma, const T* beta, T* y,
                                    long long N, int C, long long S, int Cg, int silu) {
    long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    if (i >= N) return;
    int c = (i / S) % C; long long t = (i / (C * S)) * (C / Cg) + c / Cg;
    T z = ((x[i] - mean[t]) * rstd[t]) * gamma[c] + beta[c];
    if (silu) z = z * ((T)0.5 * ((T)1 + tanh((T)0.5 * z)));
    y[i] = z;
}
extern "C" __global__ void gn_bwd_sums(const T* dy, const T* x, const T* mean, const T* rstd, const T* gamma,
                                       const T* beta, T* mg, T* mgx, long long n, int C, long long S, int Cg, int silu) {
    __shared__ double s0[RB]; __shared__ double s1[RB];
    long long t = blockIdx.x; int tid = threadIdx.x;
    int g0 = (t % (C / Cg)) * Cg;
    double a0 = 0, a1 = 0;
    for (long long k = tid; k < n; k += RB) {
        int c = g0 + k / S;
        T xh = (x[t * n + k] - mean[t]) * rstd[t];
        T gg = dz_of(dy[t * n + k], xh, gamma[c], beta[c], silu) * gamma[c];
        a0 += gg; a1 += (double)(gg * xh);
    }
    s0[tid] = a0; s1[tid] = a1; __syncthreads();
    for (int h = RB / 2; h > 0; h /= 2) { if (tid < h) { s0[tid] += s0[tid + h]; s1[tid] += s1[tid + h]; } __syncthreads(); }
    if (tid == 0) { mg[t] = (T)(s0[0] / n); mgx[t] = (T)(s1[0] / n); }
}
extern "C" __global__ void gn_bwd_apply(const T* dy, const T* x, const T* mean, const T* rstd, const T* gamma,
                                        const T* beta, const T* mg, const T* mgx, T* dx, long long N, int C,
                                        long long S, int Cg, int silu) {
    long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    if (i >= N) return;
    int c = (i / S) % C; long long t = (i / (C * S)) * (C / Cg) + c / Cg;
    T xh = (x[i] - mean[t]) * rstd[t];
    T d = dz_of(dy[i], xh, gamma[c], beta[c], silu);
    dx[i] = rstd[t] * (d * gamma[c] - mg[t] - xh * mgx[t]);
}
extern "C" __global__ void gn_param_grads(const T* dy, const T* x, const T* mean, const T* rstd, const T* gamma,
                                          const T* beta, double* dgam, double* dbet, int B, int C, long long S,
                                          int Cg, int silu) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    double pg = 0, pb = 0;
    for (int b = 0; b < B; b++) {
        long long t = (long long)b * (C / Cg) + c / Cg;
        for (long long s = 0; s < S; s++) {
            long long i = ((long long)b * C + c) * S + s;
            T xh = (x[i] - mean[t]) * rstd[t];
            T d = dz_of(dy[i], xh, gamma[c], beta[c], silu);
            pg += (double)(d * xh); pb += (double)d;
        }
    }
    dgam[c] = pg; dbet[c] = pb;
}
"""


@functools.lru_cache(maxsize=None)
def _module(dtype_name):
    ctype = {"float32": "float", "float64": "double"}[dtype_name]
    return cp.RawModule(code=f"#define RB {RB}\ntypedef {ctype} T;\n" + _SRC)


def _k(name, dtype):
    return _module(np.dtype(dtype).name).get_function(name)


def _launch(name, dtype, n, *args):
    if n:
        _k(name, dtype)(((n + TPB - 1) // TPB,), (TPB,), args)


def _t(dtype, v):
    return np.dtype(dtype).type(v)


def _c(a, dtype=None):
    return cp.ascontiguousarray(cp.asarray(a) if dtype is None else cp.asarray(a, dtype=dtype))


# --- elementwise ----------------------------------------------------------------------------------
def silu_forward(x):
    x = _c(x)
    y, s = cp.empty_like(x), cp.empty_like(x)
    _launch("silu_fwd", x.dtype, x.size, x, y, s, np.int64(x.size))
    return y, (x, s)


def silu_backward(dy, cache):
    x, s = cache
    dy, dx = _c(dy, x.dtype), cp.empty_like(x)
    _launch("silu_bwd", x.dtype, x.size, dy, x, s, dx, np.int64(x.size))
    return dx


def adam_update(p, g, m, v, lr, beta1, beta2, eps, step, weight_decay=0.0):
    t = p.dtype.type
    bc1, bc2 = 1 - beta1 ** step, 1 - beta2 ** step
    decay = t(1 - lr * weight_decay) if weight_decay else t(1)
    _launch("adam", p.dtype, p.size, p, _c(g, p.dtype), m, v, np.int64(p.size), t(beta1), t(1 - beta1), t(beta2),
            t(1 - beta2), decay, t(lr / bc1), np.float64(np.sqrt(bc2)), np.float64(eps))


def ddpm_step(x, eps, z, beta, alpha_bar, sigma):
    x = _c(x)
    coef, inv = ddpm_coeffs(beta, alpha_bar, x.dtype)
    out = cp.empty_like(x)
    zz = x if z is None else _c(z, x.dtype)
    _launch("ddpm", x.dtype, x.size, x, _c(eps, x.dtype), zz, out, np.int64(x.size), coef, inv,
            _t(x.dtype, sigma), np.int32(z is not None))
    return out


def em_step(x, score, z, a, g, dt):
    x = _c(x)
    adt, g2dt, noise = em_coeffs(a, g, dt, x.dtype)
    out = cp.empty_like(x)
    zz = x if z is None else _c(z, x.dtype)
    _launch("em", x.dtype, x.size, x, _c(score, x.dtype), zz, out, np.int64(x.size), adt, g2dt, noise,
            np.int32(z is not None))
    return out


# --- conv -------------------------------------------------------------------------------------------
def _im2col(x, kH, kW, s, p, Ho, Wo, ones_row):
    B, C, H, W = x.shape
    K = C * kH * kW
    cols = cp.empty((K + int(ones_row), B * Ho * Wo), x.dtype)
    _launch("im2col", x.dtype, cols.size, x, cols, *map(np.int32, (C, B, H, W, kH, kW, s, p, Ho, Wo, int(ones_row))))
    return cols


def _col2im(cols, C, B, H, W, kH, kW, s, p, Ho, Wo, bias=None):
    out = cp.empty((B, C, H, W), cols.dtype)
    b = cp.zeros(1, cols.dtype) if bias is None else bias
    _launch("col2im", cols.dtype, out.size, cols, out, b, np.int32(bias is not None),
            *map(np.int32, (C, B, H, W, kH, kW, s, p, Ho, Wo)))
    return out


def _cm_to_nchw(Y, B, tail):
    C = Y.shape[0]
    n = Y.shape[1] // B
    y = cp.empty((B, C) + tuple(tail), Y.dtype)
    _launch("cm_to_nchw", Y.dtype, y.size, Y, y, np.int32(C), np.int32(B), np.int64(n))
    return y


def _to_cm(x):
    return cp.ascontiguousarray(x.reshape(x.shape[0], x.shape[1], -1).transpose(1, 0, 2)).reshape(x.shape[1], -1)


def conv2d_forward(x, w, b, stride=1, padding=0):
    """cols' = [im2col(x); 1], w' = [w | b]: the bias rides in the cuBLAS GEMM."""
    stride, padding = _check_conv("conv2d", x, w, b, stride, padding, cin_axis=1)
    x = _c(x)
    w = _c(w, x.dtype)
    B, Cin, H, W = x.shape
    Cout, _, kH, kW = w.shape
    Ho, Wo = _conv_out("conv2d", H, kH, stride, padding), _conv_out("conv2d", W, kW, stride, padding)
    w2 = w.reshape(Cout, -1)
    if b is not None:
        w2 = cp.concatenate([w2, cp.asarray(b, x.dtype).reshape(Cout, 1)], axis=1)
    cols = _im2col(x, kH, kW, stride, padding, Ho, Wo, b is not None)
    y = _cm_to_nchw(w2 @ cols, B, (Ho, Wo))
    return y, (cols, w, (B, Cin, H, W), stride, padding, b is not None)


def conv2d_backward(dy, cache):
    cols, w, (B, Cin, H, W), stride, padding, has_b = cache
    Cout, _, kH, kW = w.shape
    K = Cin * kH * kW
    dy = _c(dy, w.dtype)
    Ho, Wo = dy.shape[2:]
    dY = _to_cm(dy)
    dw2 = dY @ cols.T                                         # (Cout, K[+1]); last column = db
    dx = _col2im(w.reshape(Cout, -1).T @ dY, Cin, B, H, W, kH, kW, stride, padding, Ho, Wo)
    return dx, cp.ascontiguousarray(dw2[:, :K]).reshape(w.shape), (cp.ascontiguousarray(dw2[:, K]) if has_b else None)


def conv_transpose2d_forward(x, w, b, stride=1, padding=0):
    stride, padding = _check_conv("conv_transpose2d", x, w, b, stride, padding, cin_axis=0)
    x = _c(x)
    w = _c(w, x.dtype)
    B, Cin, H, W = x.shape
    _, Cout, kH, kW = w.shape
    Ho, Wo = _convt_out(H, kH, stride, padding), _convt_out(W, kW, stride, padding)
    X = _to_cm(x)
    y = _col2im(w.reshape(Cin, -1).T @ X, Cout, B, Ho, Wo, kH, kW, stride, padding, H, W,
                None if b is None else _c(b, x.dtype))
    return y, (X, w, (H, W), stride, padding, b is not None)


def conv_transpose2d_backward(dy, cache):
    X, w, (H, W), stride, padding, has_b = cache
    Cin, Cout, kH, kW = w.shape
    dy = _c(dy, w.dtype)
    B = dy.shape[0]
    dcols = _im2col(dy, kH, kW, stride, padding, H, W, False)
    dx = _cm_to_nchw(w.reshape(Cin, -1) @ dcols, B, (H, W))
    dw = (X @ dcols.T).reshape(w.shape)
    return dx, dw, (dy.sum(axis=(0, 2, 3)) if has_b else None)


# --- group norm ---------------------------------------------------------------------------------------
def _gn(with_silu):
    def forward(x, num_groups, gamma, beta, eps=1e-5):
        _check(x, num_groups, gamma, beta)
        x = _c(x)
        dt = x.dtype
        B, C = x.shape[:2]
        S, G = x.size // (B * C), num_groups
        n = (C // G) * S
        g, be = _c(gamma, dt), _c(beta, dt)
        mean, rstd = cp.empty(B * G, dt), cp.empty(B * G, dt)
        _k("gn_stats", dt)((B * G,), (RB,), (x, mean, rstd, np.int64(n), _t(dt, eps)))
        y = cp.empty_like(x)
        _launch("gn_apply", dt, x.size, x, mean, rstd, g, be, y, np.int64(x.size), np.int32(C), np.int64(S),
                np.int32(C // G), np.int32(with_silu))
        return y, (x, G, g, be, mean, rstd)

    def backward(dy, cache):
        x, G, g, be, mean, rstd = cache
        dt = x.dtype
        B, C = x.shape[:2]
        S = x.size // (B * C)
        n, Cg = (C // G) * S, C // G
        dy = _c(dy, dt)
        mg, mgx = cp.empty(B * G, dt), cp.empty(B * G, dt)
        _k("gn_bwd_sums", dt)((B * G,), (RB,), (dy, x, mean, rstd, g, be, mg, mgx, np.int64(n), np.int32(C),
                                               np.int64(S), np.int32(Cg), np.int32(with_silu)))
        dx = cp.empty_like(x)
        _launch("gn_bwd_apply", dt, x.size, dy, x, mean, rstd, g, be, mg, mgx, dx, np.int64(x.size), np.int32(C),
                np.int64(S), np.int32(Cg), np.int32(with_silu))
        dgam, dbet = cp.empty(C, cp.float64), cp.empty(C, cp.float64)
        _launch("gn_param_grads", dt, C, dy, x, mean, rstd, g, be, dgam, dbet, np.int32(B), np.int32(C),
                np.int64(S), np.int32(Cg), np.int32(with_silu))
        return dx, dgam.astype(dt), dbet.astype(dt)
    return forward, backward


KERNELS = {
    "silu": {2: (silu_forward, silu_backward)},
    "adam_update": {2: (adam_update,)},
    "ddpm_step": {2: (ddpm_step,)},
    "em_step": {2: (em_step,)},
    "conv2d": {2: (conv2d_forward, conv2d_backward)},
    "conv_transpose2d": {2: (conv_transpose2d_forward, conv_transpose2d_backward)},
    "group_norm": {2: _gn(False)},
    "group_norm_silu": {2: _gn(True)},
}
