"""Sample-based distances between two point clouds a (N, D) and b (M, D).

- `frechet_distance`: report def. 2.5.2, the W2 distance between Gaussians fitted to
  each sample. Compares means and covariances only: an isotropic Gaussian scores about
  as well as a ring (which is how the report's ring was scored, §2.5.1), hence the two below.
- `sliced_wasserstein`: mean over random directions of the 1-D p-Wasserstein distance.
- `energy_distance`: 2 E|X-Y| - E|X-X'| - E|Y-Y'| (Szekely & Rizzo), zero iff the laws
  are equal.

Overflow: each distance is homogeneous in the data (degree 1, Fréchet degree 2), so data
beyond 2^+-300 in magnitude are divided by a power of two s ~ max |a|, |b| (exact: no
rounding) and the distance multiplied back; a result beyond float64 raises ValueError
instead of returning Inf or NaN.
"""
from __future__ import annotations

import math
import warnings

import numpy as np
import scipy.linalg

from ._checks import check_array_float, check_int, check_real, check_rng


def _check_pair(a, b, min_n=2):
    a, b = check_array_float(a, "a"), check_array_float(b, "b")
    for name, s in (("a", a), ("b", b)):
        if s.ndim != 2:
            raise ValueError(f"{name} must have shape (N, D); got {s.shape}")
        if s.shape[0] < min_n:
            raise ValueError(f"{name} needs at least {min_n} samples; got {s.shape[0]}")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"a and b must have the same dimension D; got {a.shape[1]} and {b.shape[1]}")
    return a, b


def _power_of_two_scale(a, b):
    """1 for data of magnitude m = max |a|, |b| in [2^-300, 2^300] (then squares and sums of
    squares of up to 1e9 terms stay in float64's range: computed as given); else the power of
    two s with m / s in [1, 2). Dividing by a power of two is exact (no rounding)."""
    m = max(float(np.max(np.abs(a))), float(np.max(np.abs(b))))
    if m == 0 or 2.0 ** -300 <= m <= 2.0 ** 300:
        return 1.0
    return math.ldexp(1.0, math.frexp(m)[1] - 1)


def _rescaled(value, s, degree, what):
    """value computed on data / s -> the value on the data, refusing an overflow."""
    out = value
    for _ in range(degree):
        out *= s                          # float multiplication overflows to inf (** would raise)
    if not math.isfinite(out):
        raise ValueError(f"the {what} overflows float64 for data of magnitude {s:.3g}; rescale the data")
    return out


def _psd_sqrt(s):
    """The symmetric square root of a symmetric positive semi-definite matrix (eigenvalues
    below 0, rounding noise, set to 0)."""
    w, v = np.linalg.eigh((s + s.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def _trace_sqrt_product(s1, s2):
    """Tr (S1 S2)^{1/2} for symmetric positive semi-definite S1, S2.

    First as pytorch-fid computes it, the trace of scipy.linalg.sqrtm(S1 S2) (its real part
    when the imaginary part is rounding noise), so that the scores are the ones FID users
    compare against. Where that fails (a non-finite result, or an imaginary part above 1e-3 of
    the real part: singular covariances, as when fewer images than feature dimensions are
    scored, e.g. a per-class score of 100 images in 128-d), by the symmetric form:
    Tr (R S2 R)^{1/2} with R = S1^{1/2}. R S2 R has the eigenvalues of S1 S2 (AB and BA share
    them) and is symmetric positive semi-definite, so the trace is the sum of the square roots
    of its eigenvalues (those below 0, rounding noise, count as 0)."""
    with warnings.catch_warnings():       # singular products are expected and handled below
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        covmean = scipy.linalg.sqrtm(s1 @ s2)
    if np.all(np.isfinite(covmean)):
        if not np.iscomplexobj(covmean):
            return float(np.trace(covmean))
        if np.max(np.abs(covmean.imag)) <= 1e-3 * max(1.0, np.max(np.abs(covmean.real))):
            return float(np.trace(covmean.real))
    return _trace_sqrt_symmetric(s1, s2)


def _trace_sqrt_symmetric(s1, s2):
    """Tr (R S2 R)^{1/2}, R = S1^{1/2}: _trace_sqrt_product's form for singular covariances."""
    r = _psd_sqrt(np.asarray(s1, dtype=np.float64))
    m = r @ np.asarray(s2, dtype=np.float64) @ r
    return float(np.sum(np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0.0, None))))


def _psd_sqrt(s):
    """The symmetric square root of a symmetric positive semi-definite matrix (eigenvalues
    below 0, rounding noise, set to 0)."""
    w, v = np.linalg.eigh((s + s.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_from_moments(mu1, s1, mu2, s2):
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^{1/2}) (Tr (S1 S2)^{1/2}: _trace_sqrt_product)."""
    diff = mu1 - mu2
    return float(max(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * _trace_sqrt_product(s1, s2), 0.0))


def frechet_distance(a, b):
    """Fréchet distance between Gaussians fitted to a (N, D) and b (M, D)."""
    a, b = _check_pair(a, b)
    s = _power_of_two_scale(a, b)
    a, b = a / s, b / s
    fd = frechet_from_moments(a.mean(0), np.atleast_2d(np.cov(a, rowvar=False)),
                              b.mean(0), np.atleast_2d(np.cov(b, rowvar=False)))
    return _rescaled(fd, s, 2, "Fréchet distance")


def _wasserstein_1d(pa, pb, p):
    """Exact W_p between the empirical measures of the columns of pa (n, P) and pb (m, P),
    each column sorted, -> (P,).

    W_p^p = int_0^1 |F_a^-1(q) - F_b^-1(q)|^p dq. Both quantile functions are constant
    between the merged breakpoints {i/n} U {j/m}: on the piece (q_k, q_{k+1}) they are
    pa[floor(q n)] and pb[floor(q m)] at the piece's midpoint q, so the integral is a sum
    of at most n + m terms, the same for every column (for p = 1 this is the integral of
    |F_a - F_b| over x, scipy.stats.wasserstein_distance). Equal sizes: the mean over
    sorted pairs."""
    n, m = pa.shape[0], pb.shape[0]
    if n == m:
        return np.mean(np.abs(pa - pb) ** p, axis=0) ** (1.0 / p)
    q = np.union1d(np.arange(n + 1) / n, np.arange(m + 1) / m)     # breakpoints 0 .. 1
    width, mid = np.diff(q), 0.5 * (q[1:] + q[:-1])
    ia = np.minimum((mid * n).astype(int), n - 1)
    ib = np.minimum((mid * m).astype(int), m - 1)
    return (width @ np.abs(pa[ia] - pb[ib]) ** p) ** (1.0 / p)


def sliced_wasserstein(a, b, n_projections=256, rng=None, p=1):
    """Mean over random unit directions u of W_p(u.a, u.b), the 1-D W_p exact for any
    sample sizes (`_wasserstein_1d`).

    p = 1 by default: at a few thousand points W2 is dominated by the tails and too noisy.
    """
    a, b = _check_pair(a, b, min_n=1)
    check_int(n_projections, "n_projections", lo=1)
    p = check_real(p, "p", lo=1)
    rng = np.random.default_rng(0) if rng is None else check_rng(rng)
    s = _power_of_two_scale(a, b)
    a, b = a / s, b / s
    u = rng.standard_normal((a.shape[1], n_projections))
    u /= np.linalg.norm(u, axis=0, keepdims=True)
    w = _wasserstein_1d(np.sort(a @ u, axis=0), np.sort(b @ u, axis=0), p)
    return _rescaled(float(np.mean(w)), s, 1, "sliced Wasserstein distance")


def _mean_pairwise(a, b, chunk=2048):
    total = 0.0
    for i in range(0, a.shape[0], chunk):
        d = a[i:i + chunk, None, :] - b[None, :, :]
        total += float(np.sqrt(np.sum(d * d, axis=-1)).sum())
    return total / (a.shape[0] * b.shape[0])


def energy_distance(a, b, max_n=4000, rng=None):
    """Energy distance 2E|X-Y| - E|X-X'| - E|Y-Y'| (V-statistic). O(N^2): samples larger
    than `max_n` are subsampled (with `rng`, default seed 0)."""
    a, b = _check_pair(a, b, min_n=1)
    max_n = check_int(max_n, "max_n", lo=1)
    rng = np.random.default_rng(0) if rng is None else check_rng(rng)
    s = _power_of_two_scale(a, b)
    a, b = a / s, b / s
    if a.shape[0] > max_n:
        a = a[rng.choice(a.shape[0], max_n, replace=False)]
    if b.shape[0] > max_n:
        b = b[rng.choice(b.shape[0], max_n, replace=False)]
    return _rescaled(float(2 * _mean_pairwise(a, b) - _mean_pairwise(a, a) - _mean_pairwise(b, b)), s, 1,
                     "energy distance")
