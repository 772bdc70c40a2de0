"""The models' constructors and factories (classifier, GAN, the seed UNet, unet-ddpm, the MLP):
every size at its lower bound is a model and one below is refused naming the argument; the
config records what was built (checkpoints rebuild from it); seed, dtype and backend reach the
parameters and the ops; the defaults are the documented ones; the discriminator's leaky slope
is the configured one (against a hand-written forward). Also load_state's checks, the
transposed-conv weight layout and EMA's decay bounds."""
import types

import numpy as np
import pytest

from refdiff.nn import make_model, model_from_spec, unet, unet_ddpm
from refdiff.nn.base import Model
from refdiff.nn.classifier import Classifier
from refdiff.nn.gan import GAN
from refdiff.nn.unet import UNet
from refdiff.nn.unet_ddpm import UNetDDPM
from refdiff.optim import EMA


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
    small = dict(channels=[4], attention=[], image_size=4, max_groups=2) if name == "unet_ddpm" else {}
    factory = lambda **kw: getattr(unet_ddpm if name == "unet_ddpm" else unet, name)(**small, **kw)  # noqa: E731
    m = factory()
    assert m.dtype == np.float32 and m.ops.name == "numpy"
    assert _same_params(m, factory(seed=0)) and not _same_params(m, factory(seed=1))
    assert factory(dtype=np.float64).dtype == np.float64
    pytest.importorskip("numba")
    assert factory(backend="numba").ops.name == "numba"


def test_unet_ddpm_defaults_and_config():
    m = UNetDDPM(image_size=8, channels=[4], attention=[], max_groups=2)
    assert m.name == "unet-ddpm" and m.ops.name == "numpy"
    assert {k: m.config[k] for k in ("in_channels", "blocks", "heads", "dropout", "num_classes", "emb_mult",
                                     "time_scale", "zero_init")} == dict(in_channels=1, blocks=1, heads=1, dropout=0.1,
                                                                         num_classes=0, emb_mult=4, time_scale=1000.0,
                                                                         zero_init=True)
    assert UNetDDPM(image_size=8, channels=[4], attention=[]).config["max_groups"] == 8
    assert _same_params(m, UNetDDPM(image_size=8, channels=[4], attention=[], max_groups=2, seed=0))
    with pytest.raises(ValueError, match="time_scale"):
        UNetDDPM(image_size=8, channels=[4], attention=[], time_scale=0.0)
    pytest.importorskip("numba")
    assert UNetDDPM(image_size=8, channels=[4], attention=[], max_groups=2, backend="numba").ops.name == "numba"


@pytest.mark.parametrize("kw, ok", [
    (dict(channels=[4, 8], attention=[0], image_size=8), True),            # attention at level 0 is allowed
    (dict(channels=[4, 8, 8], attention=[], image_size=12), True),         # 12 = 3 x 2^2
    (dict(channels=[4, 8, 8], attention=[], image_size=6), r"image_size 6 must be divisible by 2\^2 = 4"),
    (dict(channels=[4, 8, 6], attention=[], image_size=8, heads=4), r"heads=4 must divide the 6 channels of the middle"),
    (dict(channels=[4, 6], attention=[1], image_size=8, heads=4), "heads=4 must divide the 6 channels of attention level 1"),
    (dict(channels=[6, 8], attention=[0], image_size=8, heads=4), "heads=4 must divide the 6 channels of attention level 0"),
    (dict(channels=[], attention=[], image_size=8), "channels must be a non-empty list of positive ints"),
])
def test_unet_ddpm_config_checks(kw, ok):
    kw = dict(max_groups=2, **kw)
    if ok is True:
        UNetDDPM(**kw)
    else:
        with pytest.raises(ValueError, match=ok):
            UNetDDPM(**kw)


def test_load_state_checks_every_key_and_dtype_before_copying():
    m = make_model("mlp", dtype=np.float64, dim=2, widths=[3])
    state = {k: v.copy() for k, v in m.state().items()}
    k0 = sorted(state)[0]
    for bad, match in ((dict(state, extra=np.zeros(1)), r"unexpected \['extra'\]"),
                       ({k: v for k, v in state.items() if k != k0}, rf"missing \['{k0}'\]"),
                       (dict(state, **{k0: state[k0].astype(np.int64)}), "the state has dtype int64")):
        with pytest.raises(ValueError, match=match):
            m.load_state(bad)
    new = {k: v + 1.0 for k, v in state.items()}
    m.load_state(new)
    assert _same_params(m, types.SimpleNamespace(params=new))
    m32 = make_model("mlp", dim=2, widths=[3])
    m32.load_state(new)
    assert all(v.dtype == np.float32 for v in m32.params.values())
    pytest.importorskip("numba")
    assert model_from_spec(m.spec(), backend="numba").ops.name == "numba"


def test_unet_ddpm_checks_its_times():
    m = UNetDDPM(image_size=4, channels=[4], attention=[], max_groups=2, dtype=np.float64)
    x = np.zeros((2, 1, 4, 4))
    for t in (np.zeros(3), np.array([0.5, np.nan])):
        with pytest.raises(ValueError, match=r"t of shape \(2,\)|t contains NaN"):
            m.forward(x, t)
        with pytest.raises(ValueError, match=r"t of shape \(2,\)|t contains NaN"):
            m.predict(x, t)


def test_seed_unet_defaults_and_middle_width():
    c = UNet(channels=[4, 6], blocks=1).config
    assert c["mid_channels"] == 3                       # half the last stage when not given
    assert (c["emb_dim"], c["time_scale"], c["max_groups"], c["final_norm"]) == (100, 1000.0, 8, False)
    assert UNet(channels=[2], blocks=1).config["mid_channels"] == 1
    assert UNet(channels=[4, 6], blocks=1, mid_channels=5).config["mid_channels"] == 5
    assert UNet(channels=[4], blocks=1, final_norm=True).config["final_norm"] is True
    with pytest.raises(ValueError, match=r"mid_channels must be >= 1 \(got 0\)"):
        UNet(channels=[4], blocks=1, mid_channels=0)
    assert _same_params(UNet(channels=[4], blocks=1), UNet(channels=[4], blocks=1, seed=0))


def test_mlp_forward_jvp_checks_its_times():
    m = make_model("mlp", dtype=np.float64, dim=2, widths=[3])
    with pytest.raises(ValueError, match=r"t of shape \(2,\)"):
        m.forward_jvp(np.zeros((2, 2)), np.zeros(3), np.zeros((2, 2)))


def test_transposed_conv_weights_are_cin_by_cout():
    m = Model("m", {}, np.float64)
    m.add_conv("t", 2, 3, 4, transpose=True)
    m.add_conv("c", 2, 3, 4)
    assert m.params["t.weight"].shape == (2, 3, 4, 4) and m.params["c.weight"].shape == (3, 2, 4, 4)


def test_ema_decay_bounds_are_closed():
    m = make_model("mlp", dtype=np.float64, dim=2, widths=[3])
    for d in (0.0, 1.0):
        assert EMA(m, decay=d).decay == d
    for d in (-0.1, 1.0001):
        with pytest.raises(ValueError, match="ema decay"):
            EMA(m, decay=d)
