"""The sliced Wasserstein distance between samples of different sizes is exact.

In 1-D, W_p between the empirical measures of a (n points) and b (m points) is
(int_0^1 |F_a^-1(q) - F_b^-1(q)|^p dq)^(1/p), with both quantile functions piecewise
constant: exact on the merged breakpoints {i/n} U {j/m}. Two independent oracles:
- p = 1: scipy.stats.wasserstein_distance (integral of |F_a - F_b| over x). With D = 1 every
  unit direction is +-1 and W_1 is invariant under x -> -x, so the sliced distance is W_1.
- any p: repeating each point of a m/g times and each point of b n/g times (g = gcd)
  leaves both empirical measures unchanged and makes the sizes equal, where W_p is the
  mean over sorted pairs; the same projections (same seed) must give the same value.
Tolerance rtol 1e-12: sums of a few hundred float64 terms in a different order.
"""
import numpy as np
import pytest
import scipy.stats

from refdiff import metrics


@pytest.mark.parametrize("n, m", [(30, 45), (100, 7), (1, 5), (64, 64)])
def test_one_dimension_equals_scipy(n, m):
    rng = np.random.default_rng(n * 1000 + m)
    a, b = rng.standard_normal(n), 0.3 + 1.5 * rng.standard_normal(m)
    got = metrics.sliced_wasserstein(a[:, None], b[:, None], n_projections=3, rng=np.random.default_rng(0))
    want = scipy.stats.wasserstein_distance(a, b)
    assert got == pytest.approx(want, rel=1e-12, abs=0)


@pytest.mark.parametrize("p", [1, 2, 3.5])
def test_unequal_sizes_equal_the_repeated_samples(p):
    rng = np.random.default_rng(5)
    a, b = rng.standard_normal((30, 3)), rng.standard_normal((45, 3)) + [0.5, 0.0, -0.2]
    got = metrics.sliced_wasserstein(a, b, 32, np.random.default_rng(1), p=p)
    want = metrics.sliced_wasserstein(np.repeat(a, 3, axis=0), np.repeat(b, 2, axis=0), 32,
                                      np.random.default_rng(1), p=p)
    assert got == pytest.approx(want, rel=1e-12, abs=0)
