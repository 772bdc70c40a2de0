"""refdiff.inpaint: known entries exact, an all-known mask, the filled entries against an
oracle, and bad masks."""
import numpy as np
import pytest

from refdiff.data.toy import GaussianMixture
from refdiff.inpaint import check_mask, inpaint
from refdiff.sde import VP

A, B = np.array([1.0, 1.0, -1.0, 0.5]), np.array([-1.0, -1.0, 1.0, -0.5])


def two_images():
    """A data set of two 4-pixel images a and b (components of std 0.05), its exact score."""
    gmm = GaussianMixture([0.5, 0.5], [A, B], np.tile(0.05 ** 2 * np.eye(4), (2, 1, 1)))
    sde = VP()
    return sde, (lambda x, t: gmm.score(x, t, sde))


@pytest.mark.parametrize("step", ["em", "heun"])
def test_fills_from_the_right_image_and_keeps_known_entries(step):
    # Known: the first two pixels of a (or of b). Without the replacement half of the samples
    # would end at each image; with it every sample must end near the image the known pixels
    # come from: within 0.3 of its last two pixels (6 component stds; the images differ by >= 1).
    sde, sf = two_images()
    rng = np.random.default_rng(0)
    y = np.where(np.arange(40)[:, None] < 20, A, B) * np.array([1, 1, 0, 0])   # unknown pixels zeroed
    mask = np.array([1, 1, 0, 0])
    out = inpaint(sde, sf, y, mask, 200, rng, step=step, denoise=True)
    assert np.array_equal(out[:, :2], y[:, :2])                                # known entries exact
    target = np.where(np.arange(40)[:, None] < 20, A, B)[:, 2:]
    assert np.max(np.abs(out[:, 2:] - target)) < 0.3


def test_all_known_mask_returns_the_input():
    sde, sf = two_images()
    y = np.random.default_rng(1).standard_normal((5, 4))
    out = inpaint(sde, sf, y, np.ones((5, 4), dtype=bool), 20, np.random.default_rng(2))
    assert np.array_equal(out, y)


def test_per_image_masks():
    sde, sf = two_images()
    y = np.tile(A, (3, 1))
    mask = np.array([[1, 0, 0, 0], [0, 1, 1, 0], [1, 1, 1, 1]])
    out = inpaint(sde, sf, y, mask, 50, np.random.default_rng(3))
    assert np.array_equal(out[mask == 1], y[mask == 1])
    assert not np.array_equal(out[mask == 0], y[mask == 0])


@pytest.mark.parametrize("mask,msg", [
    (np.ones((4,)) * 0.5, "only 0"),
    (np.ones((3,)), "shape"),
    (np.ones((2, 4)), "shape"),
    (np.full((4,), np.nan), "only 0"),
    (np.array(["1", "0", "1", "0"]), "only 0"),
])
def test_bad_masks(mask, msg):
    with pytest.raises(ValueError, match=msg):
        check_mask(mask, (5, 4))
    sde, sf = two_images()
    with pytest.raises(ValueError, match="mask"):
        inpaint(sde, sf, np.zeros((5, 4)), mask, 10, np.random.default_rng(0))


def test_inpaint_from_checkpoint_keeps_known_pixels():
    from refdiff.inpaint import inpaint_from_checkpoint
    from refdiff.nn.mlp import ScoreMLP
    model = ScoreMLP(dim=4, widths=(8,), dtype=np.float64, seed=4)
    images = np.random.default_rng(0).uniform(-1, 1, (5, 1, 2, 2))
    mask = np.array([[[1, 1], [0, 0]]])                                    # top row known, one mask for all
    out = inpaint_from_checkpoint(model, {}, images, mask, np.random.default_rng(1), steps=20, batch=2)
    assert out.shape == images.shape and np.array_equal(out[:, :, 0], images[:, :, 0])
    with pytest.raises(ValueError, match="mask"):
        inpaint_from_checkpoint(model, {}, images, np.ones((1, 3, 2)), np.random.default_rng(1), steps=5)
    with pytest.raises(ValueError, match="continuous-time model"):
        inpaint_from_checkpoint(model, {"ddpm_schedule": {"kind": "cosine"}}, images, mask,
                                np.random.default_rng(1), steps=5)
