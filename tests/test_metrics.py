"""Sample distances (refdiff.metrics)."""
import numpy as np
import pytest

from refdiff import metrics


def test_frechet_closed_form_for_gaussians():
    """FD between N(m1, S1) and N(m2, S2) estimated from samples tends to the closed form;
    for commuting (diagonal) covariances it is |m1-m2|^2 + sum (sqrt(a) - sqrt(b))^2."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((200000, 2)) * [1.0, 2.0]
    b = rng.standard_normal((200000, 2)) * [3.0, 0.5] + [1.0, 0.0]
    expected = 1.0 + (1 - 3) ** 2 + (2 - 0.5) ** 2
    assert metrics.frechet_distance(a, b) == pytest.approx(expected, rel=0.01)
    assert metrics.frechet_from_moments(np.zeros(2), np.diag([1.0, 4.0]), np.array([1.0, 0]),
                                        np.diag([9.0, 0.25])) == pytest.approx(expected, rel=1e-10)


def test_frechet_same_set_is_zero_and_singular_covariance_is_fine():
    rng = np.random.default_rng(1)
    a = rng.standard_normal((500, 3))
    assert metrics.frechet_distance(a, a) < 1e-8
    flat = np.concatenate([a[:, :2], np.zeros((500, 1))], axis=1)   # rank-2 covariance
    assert np.isfinite(metrics.frechet_distance(flat, flat)) and metrics.frechet_distance(flat, flat) < 1e-6


def test_trace_sqrt_of_rank_deficient_covariances_against_closed_forms():
    """Fewer samples than dimensions (a per-class score: 100 images, 128 features) gives
    singular covariances, where scipy's sqrtm of the non-symmetric product S1 S2 can come back
    with a large imaginary part; the symmetric form Tr (R S2 R)^{1/2}, R = S1^{1/2}, that
    frechet_from_moments falls back to must be exact there. Two closed forms in 128-d:
    S1 = S2 = S (rank 40): Tr (S S)^{1/2} = Tr S; diagonal covariances with zeros:
    Tr (S1 S2)^{1/2} = sum sqrt(a_i b_i). And on a full-rank pair it equals sqrtm's trace."""
    import scipy.linalg
    rng = np.random.default_rng(3)
    x = rng.standard_normal((40, 128)) * rng.uniform(0.1, 3.0, 128)
    s = x.T @ x / 39.0                                        # rank 40 of 128
    # each of the 88 zero eigenvalues of R S R = S^2 comes back as rounding noise of size
    # ~ D u lambda_max^2, and its square root, sqrt(D u) lambda_max, enters the trace: the
    # bound is (D - rank) sqrt(D u) lambda_max
    lam = np.linalg.eigvalsh(s)[-1]
    tol = (128 - 40) * np.sqrt(128 * np.finfo(float).eps) * lam
    assert abs(metrics._trace_sqrt_symmetric(s, s) - np.trace(s)) <= tol
    assert tol < 1e-3 * np.trace(s)                          # ... which is still a sharp check
    a = np.where(rng.random(128) < 0.5, 0.0, rng.uniform(0.5, 2.0, 128))
    b = np.where(rng.random(128) < 0.5, 0.0, rng.uniform(0.5, 2.0, 128))
    assert metrics._trace_sqrt_symmetric(np.diag(a), np.diag(b)) == pytest.approx(np.sum(np.sqrt(a * b)), rel=1e-12)
    y = rng.standard_normal((300, 6))
    s1, s2 = np.cov(y[:150], rowvar=False), np.cov(y[150:] @ rng.standard_normal((6, 6)), rowvar=False)
    assert metrics._trace_sqrt_symmetric(s1, s2) == pytest.approx(np.trace(scipy.linalg.sqrtm(s1 @ s2).real),
                                                                  rel=1e-10)


def test_frechet_falls_back_where_sqrtm_fails(monkeypatch):
    """Where sqrtm returns a large imaginary part (as it did for 10 images per class in 128-d)
    or non-finite values, frechet_from_moments uses the symmetric form: the closed form
    |m1 - m2|^2 + sum (sqrt(a) - sqrt(b))^2 of diagonal covariances; before, it raised."""
    import scipy.linalg
    rng = np.random.default_rng(5)
    a, b = rng.uniform(0.5, 2.0, 16), rng.uniform(0.5, 2.0, 16)
    m1, m2 = rng.standard_normal(16), rng.standard_normal(16)
    expected = np.sum((m1 - m2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    for broken in (lambda m: m + 1.3j, lambda m: np.full_like(m, np.nan)):
        monkeypatch.setattr(scipy.linalg, "sqrtm", broken)
        assert metrics.frechet_from_moments(m1, np.diag(a), m2, np.diag(b)) == pytest.approx(expected, rel=1e-10)


def test_sliced_wasserstein_shift():
    """W1 of a shift by c along u, projected on a unit direction v, is |c u.v|; the mean of
    |u.v| over random directions in 2-D is 2/pi."""
    rng = np.random.default_rng(2)
    a = rng.standard_normal((20000, 2))
    b = a + np.array([0.5, 0.0])
    sw = metrics.sliced_wasserstein(a, b, 2000, np.random.default_rng(3))
    assert sw == pytest.approx(0.5 * 2 / np.pi, rel=0.05)
    assert metrics.sliced_wasserstein(a, a, 10, np.random.default_rng(0)) == 0.0


def test_sliced_wasserstein_unequal_sizes():
    """Shift by (1, 1): E_u |u.(1,1)| over unit directions in 2-D is sqrt(2) * 2/pi."""
    rng = np.random.default_rng(4)
    a, b = rng.standard_normal((3000, 2)), rng.standard_normal((5000, 2)) + 1.0
    sw = metrics.sliced_wasserstein(a, b, 2000, np.random.default_rng(0))
    assert sw == pytest.approx(np.sqrt(2) * 2 / np.pi, rel=0.05)


def test_energy_distance_separates_ring_from_gaussian_where_frechet_cannot():
    """Why the report's ring score (FD alone, §2.5.1) is not enough: a Gaussian with the ring's moments fools the FD."""
    from refdiff.data import ring
    rng = np.random.default_rng(5)
    r1, r2 = ring(3000, rng), ring(3000, rng)
    gauss = rng.standard_normal((3000, 2)) * r1.std(0)
    fd_floor, fd_gauss = metrics.frechet_distance(r1, r2), metrics.frechet_distance(r1, gauss)
    ed_floor, ed_gauss = metrics.energy_distance(r1, r2), metrics.energy_distance(r1, gauss)
    assert fd_gauss < 10 * fd_floor + 0.01       # FD barely notices
    assert ed_gauss > 20 * ed_floor              # energy distance does


def test_energy_distance_hand_computed():
    """2 E|X-Y| - E|X-X'| - E|Y-Y'| over the empirical laws (V-statistic, pairs with i = j
    included). a = {0, 1}, b = {1}: E|X-Y| = 1/2, E|X-X'| = (0 + 1 + 1 + 0)/4, E|Y-Y'| = 0
    -> 1/2. In 2-D, a = {(0,0)}, b = {(3,4)}: 2 * 5 = 10."""
    assert metrics.energy_distance(np.array([[0.0], [1.0]]), np.array([[1.0]])) == pytest.approx(0.5, rel=1e-15)
    assert metrics.energy_distance(np.array([[0.0, 0.0]]), np.array([[3.0, 4.0]])) == pytest.approx(10.0, rel=1e-15)
    a = np.array([[0.0, 0.0], [1.0, 0.0]])
    b = np.array([[0.0, 1.0], [2.0, 2.0], [1.0, 1.0]])
    d = lambda p, q: np.mean([[np.hypot(*(u - v)) for v in q] for u in p])
    assert metrics.energy_distance(a, b) == pytest.approx(2 * d(a, b) - d(a, a) - d(b, b), rel=1e-14)


def test_energy_distance_is_scipys_squared_in_1d():
    """scipy.stats.energy_distance(u, v) = sqrt(2 E|X-Y| - E|X-X'| - E|Y-Y'|) for 1-D samples
    (computed from the CDFs, an independent route): ours is its square."""
    from scipy.stats import energy_distance as scipy_ed
    rng = np.random.default_rng(6)
    a, b = rng.standard_normal(300), 0.5 + 2 * rng.standard_normal(170)
    assert metrics.energy_distance(a[:, None], b[:, None]) == pytest.approx(scipy_ed(a, b) ** 2, rel=1e-10)


def test_energy_distance_gaussian_closed_form():
    """For X ~ N(m1, s1^2), Y ~ N(m2, s2^2) in 1-D, E|X-Y| is the mean of a folded normal
    N(m1-m2, s1^2+s2^2): E|Z| = s sqrt(2/pi) exp(-mu^2/2s^2) + mu (1 - 2 Phi(-mu/s)), and
    E|X-X'| = 2 s1 / sqrt(pi). With 4,000 draws each (the default max_n) the V-statistic's
    bias is O(1/n) and its standard error ~0.01 here: rel 5 %."""
    from scipy.stats import norm
    def folded(mu, s):
        return s * np.sqrt(2 / np.pi) * np.exp(-mu ** 2 / (2 * s * s)) + mu * (1 - 2 * norm.cdf(-mu / s))
    m1, s1, m2, s2 = 0.0, 1.0, 1.5, 0.5
    exact = 2 * folded(m1 - m2, np.hypot(s1, s2)) - 2 * s1 / np.sqrt(np.pi) - 2 * s2 / np.sqrt(np.pi)
    rng = np.random.default_rng(7)
    a, b = m1 + s1 * rng.standard_normal((4000, 1)), m2 + s2 * rng.standard_normal((4000, 1))
    assert metrics.energy_distance(a, b) == pytest.approx(exact, rel=0.05)


def test_energy_distance_subsamples_above_max_n():
    """Above max_n both samples are subsampled with rng: the result is the full formula on
    those rows (drawn as rng.choice(N, max_n, replace=False), a first, then b)."""
    rng = np.random.default_rng(8)
    a, b = rng.standard_normal((50, 2)), rng.standard_normal((40, 2)) + 0.3
    got = metrics.energy_distance(a, b, max_n=30, rng=np.random.default_rng(9))
    r = np.random.default_rng(9)
    sa, sb = a[r.choice(50, 30, replace=False)], b[r.choice(40, 30, replace=False)]
    assert got == pytest.approx(metrics.energy_distance(sa, sb), rel=1e-14)
    assert metrics.energy_distance(a, b, max_n=50) == metrics.energy_distance(a, b)


@pytest.mark.parametrize("fn", [metrics.frechet_distance, metrics.sliced_wasserstein, metrics.energy_distance])
def test_metric_bad_input(fn):
    with pytest.raises(ValueError, match=r"must have shape \(N, D\)"):
        fn(np.zeros(10), np.zeros((10, 2)))
    with pytest.raises(ValueError, match="same dimension D"):
        fn(np.zeros((10, 2)), np.zeros((10, 3)))
    with pytest.raises(ValueError, match="contains NaN or Inf"):
        fn(np.full((10, 2), np.nan), np.zeros((10, 2)))


def test_frechet_needs_two_samples():
    with pytest.raises(ValueError, match="at least 2 samples"):
        metrics.frechet_distance(np.zeros((1, 2)), np.zeros((5, 2)))
