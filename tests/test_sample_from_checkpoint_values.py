"""refdiff.ddpm.sample_from_checkpoint against the samplers it dispatches to: the same draws
from the same seed, so every output must equal the direct call's bit for bit, reshaped to the
image shape the checkpoint records (or the model's input shape). This pins each argument it
passes on (steps, eta, spacing and its default rule, variance, clip, batch, frames,
trajectories, the checkpoint's schedule and its VP SDE) and each default it fills in."""
import numpy as np
import pytest

from refdiff import ddpm
from refdiff.nn import make_model
from refdiff.sde import DDPMSchedule

SCHED = dict(num_steps=100, beta_start=1e-3, beta_end=0.05)
META = {"ddpm_schedule": SCHED, "image_shape": [1, 4, 4]}
N = 3


@pytest.fixture(scope="module")
def model():
    return make_model("mlp", dim=16, widths=(8,), seed=0)


def _same(got, want, image_shape=(1, 4, 4)):
    x, traj = got
    wx, wtraj = want
    assert x.shape == (N,) + image_shape
    assert np.array_equal(x, wx.reshape(x.shape))
    assert traj.shape == wtraj.shape[:2] + image_shape
    assert np.array_equal(traj, wtraj.reshape(traj.shape))


def _rng():
    return np.random.default_rng(7)


def test_ddpm_is_the_ancestral_sampler(model):
    kw = dict(variance="beta_tilde", clip=True, return_trajectory=True, frames=4, batch=2)
    got = ddpm.sample_from_checkpoint(model, META, N, _rng(), sampler="ddpm", **kw)
    _same(got, ddpm.ancestral(model, DDPMSchedule(**SCHED), (N, 16), _rng(), **kw))


@pytest.mark.parametrize("steps, spacing", [(None, "uniform"), (20, "uniform"), (30, "linspace")])
def test_ddim_steps_and_the_spacing_rule(model, steps, spacing):
    # default 50 steps; spacing "uniform" when the steps divide N = 100, else "linspace"
    kw = dict(eta=0.5, clip=True, return_trajectory=True, frames=3, batch=2)
    got = ddpm.sample_from_checkpoint(model, META, N, _rng(), sampler="ddim", steps=steps, **kw)
    want = ddpm.ddim(model, DDPMSchedule(**SCHED), (N, 16), _rng(), steps=50 if steps is None else steps,
                     spacing=spacing, **kw)
    _same(got, want)


def test_ddim_explicit_spacing_is_passed_on(model):
    kw = dict(return_trajectory=True, frames=2, batch=5)
    got = ddpm.sample_from_checkpoint(model, META, N, _rng(), sampler="ddim", steps=20, spacing="linspace", **kw)
    _same(got, ddpm.ddim(model, DDPMSchedule(**SCHED), (N, 16), _rng(), steps=20, spacing="linspace", **kw))


@pytest.mark.parametrize("steps, spacing", [(None, None), (40, "squared")])
def test_em_runs_the_checkpoints_vp_sde(model, steps, spacing):
    kw = dict(return_trajectory=True, frames=3, batch=2)
    got = ddpm.sample_from_checkpoint(model, META, N, _rng(), sampler="em", steps=steps, spacing=spacing, **kw)
    want = ddpm.em_vp(model, (N, 16), _rng(), steps=1000 if steps is None else steps, spacing=spacing or "uniform",
                      sde=ddpm.vp_for_schedule(DDPMSchedule(**SCHED)), **kw)
    _same(got, want)


def test_without_image_shape_the_models_input_shape_is_kept(model):
    got = ddpm.sample_from_checkpoint(model, {"ddpm_schedule": SCHED}, N, _rng(), sampler="ddim", steps=10,
                                      return_trajectory=True)
    want = ddpm.ddim(model, DDPMSchedule(**SCHED), (N, 16), _rng(), steps=10, return_trajectory=True)
    _same(got, want, image_shape=(16,))
    x = ddpm.sample_from_checkpoint(model, META, 1, _rng(), sampler="ddim", steps=10)   # no trajectory: x only
    assert isinstance(x, np.ndarray) and x.shape == (1, 1, 4, 4)
    assert np.array_equal(x, ddpm.ddim(model, DDPMSchedule(**SCHED), (1, 16), _rng(), steps=10).reshape(x.shape))
