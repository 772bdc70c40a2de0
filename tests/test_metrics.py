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
    """The point of SEED_NOTES §4: a Gaussian with the ring's moments fools the FD."""
    from refdiff.data import ring
    rng = np.random.default_rng(5)
    r1, r2 = ring(3000, rng), ring(3000, rng)
    gauss = rng.standard_normal((3000, 2)) * r1.std(0)
    fd_floor, fd_gauss = metrics.frechet_distance(r1, r2), metrics.frechet_distance(r1, gauss)
    ed_floor, ed_gauss = metrics.energy_distance(r1, r2), metrics.energy_distance(r1, gauss)
    assert fd_gauss < 10 * fd_floor + 0.01       # FD barely notices
    assert ed_gauss > 20 * ed_floor              # energy distance does


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
