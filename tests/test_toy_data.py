"""Toy data and the Gaussian-mixture oracle score."""
import numpy as np
import pytest

from refdiff.data import GaussianMixture, make_toy, ring
from refdiff.sde import OU, VE, VP
from tests.helpers import assert_close, assert_fd, fd_grad


@pytest.mark.parametrize("sde", [VP(), OU(5.0), VE(0.01, 4.0)], ids=repr)
def test_mixture_score_is_grad_log_density(sde):
    """Against central differences of the diffused density, written out with scipy."""
    from scipy.stats import multivariate_normal as mvn
    rng = np.random.default_rng(0)
    g = GaussianMixture([0.3, 0.7], rng.standard_normal((2, 3)),
                        np.stack([np.diag([0.5, 1.0, 2.0]), 0.3 * np.eye(3) + 0.1]))
    x, t = rng.standard_normal((6, 3)), 0.2 * sde.T
    gamma, std = sde.marginal_coeffs(t)

    def logp(z):
        return np.log(sum(w * mvn.pdf(z, gamma * m, gamma ** 2 * c + std ** 2 * np.eye(3))
                          for w, m, c in zip(g.weights, g.means, g.covs)))
    num = np.array([fd_grad(lambda: logp(z), z) for z in x.copy()])        # (6, 2, 3): value, bound
    assert_fd(g.score(x, t, sde), (num[:, 0], num[:, 1]), name="mixture score")


def test_ring_statistics():
    x = ring(50000, np.random.default_rng(0))
    r = np.linalg.norm(x, axis=1)
    assert abs(r.mean() - 1.0) < 0.005 and abs(r.std() - 0.1) < 0.005
    assert np.all(np.abs(x.mean(0)) < 0.02)


@pytest.mark.parametrize("name", ["ring", "moons", "swiss_roll", "gmm"])
def test_toys_are_reproducible_and_shaped(name):
    draw = make_toy(name)
    a, b = draw(100, np.random.default_rng(3)), draw(100, np.random.default_rng(3))
    assert a.shape == (100, 2) and np.array_equal(a, b) and np.all(np.isfinite(a))


def test_bad_toy_inputs():
    with pytest.raises(ValueError, match="unknown toy dataset"):
        make_toy("spiral")
    with pytest.raises(ValueError, match="n must be an integer >= 1"):
        ring(0, np.random.default_rng(0))
    with pytest.raises(ValueError, match="weights must be"):
        GaussianMixture([0.5, 0.6], np.zeros((2, 2)), np.tile(np.eye(2), (2, 1, 1)))
    with pytest.raises(ValueError, match="covs must have shape"):
        GaussianMixture([1.0], np.zeros((1, 2)), np.eye(3)[None])


def test_image_loaders_reachable_from_refdiff_data():
    import refdiff.data as data
    from refdiff.data import load_images
    assert data.load_images is load_images
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        data.nope
