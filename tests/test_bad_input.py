"""Each validation error is raised with a message naming the problem (one test per case)."""
import numpy as np
import pytest

from refdiff import samplers
from refdiff.nn import make_model
from refdiff.optim import EMA, Adam, clip_grad_norm
from refdiff.sde import OU, VE, VP, DDPMSchedule, SubVP, make_sde


@pytest.mark.parametrize("build, match", [
    (lambda: OU(0.0), "beta must be a finite number > 0"),
    (lambda: OU(-1.0), "beta must be a finite number > 0"),
    (lambda: OU(1.0, sigma=0.0), "sigma must be a finite number > 0"),
    (lambda: OU(1.0, T=float("nan")), "T must be a finite number > 0"),
    (lambda: VP(beta_min=0.0), "beta_min must be a finite number > 0"),
    (lambda: VP(beta_min=5.0, beta_max=1.0), "beta_max must be >= beta_min"),
    (lambda: SubVP(beta_max=-1.0), "beta_max must be a finite number > 0"),
    (lambda: VE(sigma_min=1.0, sigma_max=1.0), "sigma_min must be < sigma_max"),
    (lambda: VE(sigma_min=-0.1), "sigma_min must be a finite number > 0"),
    (lambda: make_sde("cosine"), "unknown SDE 'cosine'"),
    (lambda: DDPMSchedule(num_steps=0), "num_steps must be an integer >= 1"),
    (lambda: DDPMSchedule(beta_start=0.1, beta_end=0.01), "0 < beta_start <= beta_end < 1"),
    (lambda: DDPMSchedule(kind="sqrt"), "schedule kind must be"),
])
def test_bad_sde_parameters(build, match):
    with pytest.raises(ValueError, match=match):
        build()


@pytest.mark.parametrize("t, match", [
    (-0.1, r"t must lie in \[0, T=1.0\]"),
    (1.5, r"t must lie in \[0, T=1.0\]"),
    (np.array([0.5, np.nan]), "t must be finite"),
])
def test_t_outside_range(t, match):
    with pytest.raises(ValueError, match=match):
        VP().marginal(np.zeros((2, 2)), t)


def test_t_shape_mismatch():
    with pytest.raises(ValueError, match=r"t must be a scalar or have shape \(3,\)"):
        VP().marginal(np.zeros((3, 2)), np.array([0.1, 0.2]))


def test_score_shape_mismatch():
    with pytest.raises(ValueError, match="score must have the shape of x"):
        VP().reverse_drift(np.zeros((3, 2)), 0.5, np.zeros((3, 3)))


def test_ddpm_timesteps_must_be_integers_in_range():
    s = DDPMSchedule()
    with pytest.raises(ValueError, match="must be integers"):
        s.marginal(np.zeros((1, 2)), np.array([0.5]))
    with pytest.raises(ValueError, match=r"must lie in \[0, 999\]"):
        s.marginal(np.zeros((1, 2)), np.array([1000]))


def test_sampler_bad_steps_and_score_shape():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="steps must be an integer >= 1"):
        samplers.euler_maruyama(VP(), lambda x, t: x, (4, 2), 0, rng)
    with pytest.raises(ValueError, match=r"score_fn returned shape \(4, 3\)"):
        samplers.euler_maruyama(VP(), lambda x, t: np.zeros((4, 3)), (4, 2), 5, rng)
    with pytest.raises(ValueError, match="spacing must be one of"):
        samplers.euler_maruyama(VP(), lambda x, t: x, (4, 2), 5, rng, spacing="log")


def test_model_bad_inputs():
    m = make_model("mlp", dim=2)
    with pytest.raises(ValueError, match=r"expects x of shape \(B, 2\); got \(3, 4\)"):
        m.forward(np.zeros((3, 4), np.float32), np.zeros(3))
    with pytest.raises(ValueError, match="x contains NaN or Inf"):
        m.forward(np.array([[np.inf, 0]], np.float32), np.zeros(1))
    with pytest.raises(ValueError, match=r"expects t of shape \(3,\)"):
        m.forward(np.zeros((3, 2), np.float32), np.zeros(2))
    with pytest.raises(ValueError, match="unknown model 'resnet'"):
        make_model("resnet")
    with pytest.raises(ValueError, match="bad options for model 'mlp'"):
        make_model("mlp", depth=3)
    with pytest.raises(ValueError, match="dtype must be float32 or float64"):
        make_model("mlp", dtype=np.float16)
    with pytest.raises(RuntimeError, match="backward called before forward"):
        make_model("mlp").backward(np.zeros((1, 2), np.float32))


@pytest.mark.parametrize("kwargs, match", [
    (dict(lr=0.0), r"lr must lie in \(0"),
    (dict(lr=float("inf")), "lr must lie in"),
    (dict(betas=(1.0, 0.999)), r"beta1 must lie in \[0, 1\)"),
    (dict(betas=(0.9, -0.1)), "beta2 must lie in"),
    (dict(betas=(0.9, 1.0)), r"beta2 must lie in \[0, 1\)"),
    (dict(betas=(0.9, 2.0)), r"beta2 must lie in \[0, 1\)"),
    (dict(eps=0.0), "eps must lie in"),
    (dict(eps=float("inf")), "eps must lie in"),
    (dict(weight_decay=-1.0), "weight_decay must lie in"),
    (dict(weight_decay=float("inf")), "weight_decay must lie in"),
])
def test_bad_optimizer_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Adam(make_model("mlp", dim=2), **kwargs)


def test_bad_ema_and_clip():
    m = make_model("mlp", dim=2)
    with pytest.raises(ValueError, match="ema decay must lie in"):
        EMA(m, decay=1.5)
    with pytest.raises(ValueError, match="max_norm must lie in"):
        clip_grad_norm(m, 0.0)
    m.grads["out.bias"][0] = np.nan
    with pytest.raises(FloatingPointError, match="gradient norm is nan"):
        clip_grad_norm(m, 1.0)
