"""The classifier's and the GAN's constructors: every size at its lower bound (1) is a model and
0 is refused naming the argument; the config records what was built (checkpoints rebuild from
it); seed and backend reach the parameters and the ops; the defaults are the documented ones;
the discriminator's leaky slope is the configured one (against a hand-written forward)."""
import numpy as np
import pytest

from refdiff.nn.classifier import Classifier
from refdiff.nn.gan import GAN


def _same_params(a, b):
    return a.params.keys() == b.params.keys() and all(np.array_equal(a.params[k], b.params[k]) for k in a.params)


@pytest.mark.parametrize("kw", [dict(channels=(0, 4)), dict(channels=(4, 0)), dict(hidden=0), dict(classes=0)])
def test_classifier_refuses_a_zero_size(kw):
    with pytest.raises(ValueError, match="classifier needs positive channels, hidden, classes"):
        Classifier(**kw)


def test_classifier_sizes_config_seed_backend():
    one = Classifier(channels=(1, 1), hidden=1, classes=1, dtype=np.float64)
    assert one.config == dict(channels=[1, 1], hidden=1, classes=1)
    assert one.forward(np.zeros((2, 1, 28, 28))).shape == (2, 1)
    small = dict(channels=(2, 3), hidden=5, classes=4, dtype=np.float64)
    assert Classifier(**small).config == dict(channels=[2, 3], hidden=5, classes=4)
    assert _same_params(Classifier(**small), Classifier(**small, seed=0))          # default seed 0
    assert not _same_params(Classifier(**small), Classifier(**small, seed=1))
    default = Classifier()
    assert default.config == dict(channels=[32, 64], hidden=128, classes=10) and default.dtype == np.float32
    pytest.importorskip("numba")
    assert Classifier(**small, backend="numba").ops.name == "numba" and Classifier(**small).ops.name == "numpy"


@pytest.mark.parametrize("kw, what", [(dict(g_hidden=[0]), "^gan g_hidden must"), (dict(d_hidden=[]), "^gan d_hidden must"),
                                      (dict(z_dim=0), "z_dim >= 1"), (dict(slope=1.0), "slope < 1"),
                                      (dict(slope=-0.1), "0 <= slope")])
def test_gan_refuses(kw, what):
    with pytest.raises(ValueError, match=what):
        GAN(**kw)


def test_gan_sizes_config_seed_backend():
    small = dict(z_dim=1, g_hidden=(1,), d_hidden=(1,), slope=0.0, dtype=np.float64)
    gan = GAN(**small)                                  # every size at 1, slope 0 (a ReLU): allowed
    assert gan.config == dict(z_dim=1, g_hidden=[1], d_hidden=[1], slope=0.0)
    assert gan.generate_forward(np.zeros((2, 1)))[0].shape == (2, 1, 28, 28)
    assert _same_params(GAN(**small), GAN(**small, seed=0)) and not _same_params(GAN(**small), GAN(**small, seed=1))
    default = GAN()
    assert default.config == dict(z_dim=64, g_hidden=[128, 256, 512], d_hidden=[512, 256, 128], slope=0.2)
    pytest.importorskip("numba")
    assert GAN(**small, backend="numba").ops.name == "numba" and GAN(**small).ops.name == "numpy"


@pytest.mark.parametrize("slope", [0.0, 0.1, 0.5])
def test_discriminator_uses_its_slope(slope):
    gan = GAN(z_dim=2, g_hidden=(3,), d_hidden=(4, 3), slope=slope, dtype=np.float64, seed=2)
    x = np.random.default_rng(0).uniform(-1, 1, (3, 1, 28, 28))
    h = x.reshape(3, -1)
    for i, name in enumerate(gan.d_names):
        h = h @ gan.params[name + ".weight"].T + gan.params[name + ".bias"]
        if i < len(gan.d_names) - 1:
            h = np.where(h > 0, h, slope * h)
    np.testing.assert_allclose(gan.discriminate_forward(x)[0], h, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", ["unet_seed", "unet_seed_fixed", "unet_seed_skip", "unet_ddpm"])
def test_unet_factories_pass_dtype_seed_and_backend(name):
    from refdiff.nn import unet, unet_ddpm
    small = dict(channels=[4], attention=[], image_size=4, max_groups=2) if name == "unet_ddpm" else {}
    factory = lambda **kw: getattr(unet_ddpm if name == "unet_ddpm" else unet, name)(**small, **kw)  # noqa: E731
    m = factory()
    assert m.dtype == np.float32 and m.ops.name == "numpy"
    assert _same_params(m, factory(seed=0)) and not _same_params(m, factory(seed=1))
    assert factory(dtype=np.float64).dtype == np.float64
    pytest.importorskip("numba")
    assert factory(backend="numba").ops.name == "numba"
