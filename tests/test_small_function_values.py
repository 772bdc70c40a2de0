"""Values of small functions of the reference that other tests call but whose result they do
not pin: a model called as a function, sampling one image, the JVP dual's products by a
constant, the lr schedule without warmup, the classifier's random shift, and the Fréchet
distance of data too large or too small to square in float64."""
import math

import numpy as np
import pytest

from refdiff.ddpm import model_input_shape
from refdiff.metrics import energy_distance, frechet_distance
from refdiff.nn import make_model
from refdiff.nn.classifier import random_shift
from refdiff.nn.unet_jvp import Dual
from refdiff.optim import lr_factor
from tests.helpers import TINY_UNETS


@pytest.mark.parametrize("name, kw", [("mlp", dict(dim=2, widths=(8,))), ("unet", TINY_UNETS["odd"]),
                                      ("unet-ddpm", None)])
def test_calling_a_model_is_its_forward(name, kw):
    rng = np.random.default_rng(0)
    if name == "unet-ddpm":
        m = make_model(name, dtype=np.float64, seed=1, in_channels=1, image_size=4, channels=(4, 4), blocks=1,
                       attention=(1,), heads=1, dropout=0.3, num_classes=3, max_groups=2, time_scale=10.0,
                       zero_init=False)
        x, t, y = rng.standard_normal((2, 1, 4, 4)), np.array([0.3, 0.8]), np.array([0, 2])
        got, want = m(x, t, y, np.random.default_rng(5)), m.forward(x, t, y, np.random.default_rng(5))
    else:
        m = make_model(name, dtype=np.float64, seed=1, **kw)
        x = rng.standard_normal((2,) + tuple(model_input_shape(m)))
        t = np.array([0.3, 0.8])
        got, want = m(x, t), m.forward(x, t)
    first = lambda out: out[0] if isinstance(out, tuple) else out
    assert np.array_equal(first(got), first(want))


@pytest.mark.parametrize("name", ["gan", "vae"])
def test_sampling_one_image(name):
    m = make_model(name, dtype=np.float64, seed=0)
    one = m.sample(1, np.random.default_rng(3))
    assert one.shape == (1, 1, 28, 28)
    assert np.all(np.abs(one) <= 1)


def test_dual_times_a_constant():
    x, dot, c = np.array([1.0, -2.0, 3.0]), np.array([0.5, 4.0, -1.0]), np.array([2.0, -3.0, 0.25])
    for d in (Dual(x, dot) * c, c * Dual(x, dot)):
        assert np.array_equal(d.x, x * c) and np.array_equal(d.dot, dot * c)


def test_cosine_schedule_without_warmup():
    # warmup defaults to 0: the cosine starts at once, 0.5 (1 + cos(pi step / total))
    for step in (0, 1, 7):
        assert lr_factor(step, schedule="cosine", total=10) == pytest.approx(0.5 * (1 + math.cos(math.pi * step / 10)),
                                                                            rel=1e-15)
    assert lr_factor(10, schedule="cosine", total=10) == 0.0


def test_random_shift_values():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((400, 2, 5, 3)).astype(np.float32)
    out = random_shift(x, np.random.default_rng(1), 2, fill=-1.0)
    assert out.dtype == np.float32 and out.shape == x.shape
    oy, ox = np.random.default_rng(1).integers(0, 5, size=(2, 400))      # the draws random_shift makes
    for b in (0, 1, 2, 399):
        want = np.full((2, 9, 7), -1.0, np.float32)
        want[:, 2:7, 2:5] = x[b]
        assert np.array_equal(out[b], want[:, oy[b]:oy[b] + 5, ox[b]:ox[b] + 3])
    assert set(oy.tolist()) == set(range(5)) and set(ox.tolist()) == set(range(5))   # shifts -2 .. 2


@pytest.mark.parametrize("k", [-400, 400])
def test_frechet_distance_of_data_out_of_float64_squaring_range(k):
    # data scaled by 2^k: the distance scales by 2^2k (squared distances and covariances); the
    # data are rescaled by a power of two inside, so only the rounding of the moments differs
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((50, 3)), rng.standard_normal((60, 3)) + 0.5
    lam = math.ldexp(1.0, k)
    assert frechet_distance(a * lam, b * lam) == pytest.approx(frechet_distance(a, b) * lam * lam, rel=1e-9, abs=0)


@pytest.mark.parametrize("k", [-540, 540])
def test_energy_distance_of_data_whose_squares_leave_float64(k):
    # at 2^+-540 the squared coordinates under- or overflow float64 (2^-1080 is below the
    # smallest subnormal, 2^1080 above the largest float): only the power-of-two rescaling
    # keeps the distance, which scales by 2^k (it is a mean of norms)
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((40, 3)), rng.standard_normal((30, 3)) + 0.5
    lam = math.ldexp(1.0, k)
    assert energy_distance(a * lam, b * lam) == pytest.approx(energy_distance(a, b) * lam, rel=1e-9, abs=0)
