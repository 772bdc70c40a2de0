"""The small public helpers of the numerical core, each by value: DDPM time and shape helpers,
the sampler-step scalars, time sampling, the models' init and input checks, the UNet's skip
coefficient. float64 unless said; same formula in another order: TOL[float64]."""
import math

import numpy as np
import pytest

from refdiff import ddpm, losses
from refdiff.nn import make_model, steps
from refdiff.nn.unet import UNet
from refdiff.sde import VP, DDPMSchedule
from tests.helpers import TINY_UNETS, TOL, assert_close, assert_fd, fd_grad, inner

F64 = TOL[np.dtype(np.float64)]


def test_model_time_maps_steps_to_0_1():
    """Step i of N -> (i + 1) / N: 0 -> 1/N, N - 1 -> 1 (the report's t/N with t = 1..N)."""
    assert_close(ddpm.model_time(np.array([0, 4, 999]), 1000), np.array([0.001, 0.005, 1.0]), name="t", **F64)
    assert ddpm.model_time(9, 10) == 1.0


def test_model_input_shape():
    assert ddpm.model_input_shape(make_model("mlp", dim=3)) == (3,)
    unet = UNet(dtype=np.float64, **TINY_UNETS["odd"])
    assert ddpm.model_input_shape(unet) == (2, 7, 7)


def test_schedule_from_meta():
    """The recorded schedule, else the report's linear 1e-4 -> 0.02 over 1,000 steps."""
    default = ddpm.schedule_from_meta({})
    assert default.num_steps == 1000 and default.betas[0] == 1e-4 and default.betas[-1] == pytest.approx(0.02)
    cos = ddpm.schedule_from_meta({"ddpm_schedule": {"kind": "cosine", "num_steps": 50}})
    assert np.array_equal(cos.betas, DDPMSchedule(50, kind="cosine").betas)


def test_step_scalars():
    """ddpm_coeffs = (beta / sqrt(1 - abar), 1 / sqrt(1 - beta)); em_coeffs = (a dt, g^2 dt,
    g sqrt(dt)); each cast to the requested dtype."""
    c, inv = steps.ddpm_coeffs(0.02, 0.3, np.float32)
    assert c.dtype == np.float32 and c == np.float32(0.02 / math.sqrt(0.7)) and inv == np.float32(1 / math.sqrt(0.98))
    adt, g2dt, noise = steps.em_coeffs(3.0, 2.0, 0.01, np.float64)
    assert (adt, g2dt, noise) == (3.0 * 0.01, 4.0 * 0.01, 2.0 * 0.1)


def test_ddpm_and_em_steps_by_value():
    rng = np.random.default_rng(0)
    x, e, z = rng.standard_normal((3, 4, 2))
    got = steps.ddpm_step(x, e, z, 0.02, 0.3, 0.1)
    assert_close(got, (x - 0.02 / np.sqrt(0.7) * e) / np.sqrt(0.98) + 0.1 * z, name="ddpm_step", **F64)
    assert_close(steps.ddpm_step(x, e, None, 0.02, 0.3, 0.1), (x - 0.02 / np.sqrt(0.7) * e) / np.sqrt(0.98),
                 name="ddpm_step, no noise", **F64)
    got = steps.em_step(x, e, z, 3.0, 2.0, 0.01)
    assert_close(got, x - (-3.0 * x - 4.0 * e) * 0.01 + 2.0 * 0.1 * z, name="em_step", **F64)


def test_sample_time_is_uniform_on_tmin_T():
    """U(t_min, T): every draw inside, mean (t_min + T)/2 within 5 standard errors."""
    sde, n = VP(T=2.0), 40_000
    t = losses.sample_time(sde, n, np.random.default_rng(0), 0.1)
    assert t.shape == (n,) and t.min() >= 0.1 and t.max() < 2.0
    assert abs(t.mean() - 1.05) < 5 * (1.9 / math.sqrt(12)) / math.sqrt(n)


def test_check_t():
    vp = VP(T=2.0)
    assert_close(vp.check_t(np.array([0.0, 2.0])), np.array([0.0, 2.0]), name="t", **F64)
    with pytest.raises(ValueError):
        vp.check_t(2.5)
    s = DDPMSchedule(10)
    assert np.array_equal(s.check_t(np.array([0, 9])), [0, 9])
    with pytest.raises(ValueError, match="must be integers"):
        s.check_t(np.array([0.5]))
    with pytest.raises(ValueError, match="must lie in"):
        s.check_t(np.array([10]))
    with pytest.raises(ValueError, match="must lie in"):
        s.check_t(np.array([-1]))


def test_pytorch_default_init_bounds():
    """add_linear / add_conv draw U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in = weight.shape[1]
    k^2 for a conv and a transposed conv alike: every entry inside, the extremes near it."""
    m = make_model("mlp", dim=3, widths=[400], dtype=np.float64, seed=0)
    w = m.params["layers.0.weight"] if "layers.0.weight" in m.params else next(iter(m.params.values()))
    bound = 1 / math.sqrt(w.shape[1])
    assert np.abs(w).max() <= bound and np.abs(w).max() > 0.95 * bound
    unet = UNet(dtype=np.float64, seed=0, **TINY_UNETS["odd"])
    for k, p in unet.params.items():
        if k.endswith(".weight") and p.ndim == 4:
            bound = 1 / math.sqrt(p.shape[1] * p.shape[2] * p.shape[3])
            assert np.abs(p).max() <= bound, k


def test_unet_skip_coefficient_is_vp_std():
    """c(t) = sqrt(1 - exp(-2 int_0^t beta)) of VP(0.1, 20): VP's marginal std."""
    unet = UNet(dtype=np.float64, **TINY_UNETS["skip"])
    t = np.array([0.01, 0.5, 1.0])
    assert_close(unet.skip_coefficient(t).reshape(-1), VP(0.1, 20.0).marginal_coeffs(t)[1], name="c(t)", **F64)


def test_classifier_predict_batches_like_one_pass():
    """Batches of 3 give one pass's logits, up to BLAS's batch-size-dependent float32 order."""
    m = make_model("classifier", seed=0)
    x = np.random.default_rng(0).uniform(-1, 1, (7, 1, 28, 28)).astype(np.float32)
    assert_close(m.predict(x, batch=3), m.logits_and_features(x)[0], name="logits", **TOL[np.dtype(np.float32)])


def test_gan_model_interface_backward_is_the_generators_vjp():
    """GAN.forward / backward (the Model interface: z -> image) against central differences of
    sum(forward(z) dy) on a few entries of z, float64."""
    m = make_model("gan", dtype=np.float64, seed=0)
    rng = np.random.default_rng(0)
    z = rng.standard_normal((2, m.config.get("z_dim", 64)))
    img = m.forward(z)
    dy = rng.standard_normal(img.shape)
    dz = m.backward(dy)
    with pytest.raises(RuntimeError, match="before forward"):      # backward consumes the cache
        m.backward(dy)
    sub = (slice(0, 1), slice(0, 4))
    assert_fd(dz[sub], fd_grad(lambda: inner(m.forward(z), dy), z[sub]), name="dz")
