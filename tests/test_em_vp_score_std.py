"""em_vp's eps -> score conversion: s = -eps_theta(x, t) / std, with std either

- "continuous" (the default): std_t of the VP SDE, sqrt(1 - exp(2 log_gamma(t)));
- "discrete": sqrt(1 - abar_i) of the DDPM chain the model was trained on, at the chain
  step i = round(t N) - 1 (refdiff's model time t = (i + 1) / N; score_sde uses the same
  sqrt(1 - alphas_cumprod) for discretely trained models, indexed in its own label
  convention int(t (N - 1))).

Oracle: refdiff.samplers.euler_maruyama, the generic sampler, fed a score function written
here from the formula above, with the same grid and draws (rtol 1e-10: the same float64
operations in another order over 50 steps); and the Tweedie step by hand.
"""
import numpy as np
import pytest

from refdiff import ddpm
from refdiff.nn import make_model
from refdiff.samplers import euler_maruyama
from refdiff.sde import VP, DDPMSchedule

SCHED = DDPMSchedule()
T_MIN = 1e-3


def model():
    return make_model("mlp", dim=5, widths=(16,), dtype=np.float64, seed=2)


def discrete_std(t):
    i = np.clip(np.rint(np.asarray(t) * SCHED.num_steps).astype(int) - 1, 0, SCHED.num_steps - 1)
    return np.sqrt(1 - SCHED.alpha_bars[i])


def test_discrete_std_is_euler_maruyama_on_that_score():
    m, sde = model(), VP(0.1, 20.0)
    got = ddpm.em_vp(m, (7, 5), np.random.default_rng(4), steps=50, denoise=False, score_std="discrete",
                     schedule=SCHED)
    score = lambda x, t: -m.forward(x, t) / discrete_std(t)[:, None]
    want = euler_maruyama(sde, score, (7, 5), 50, np.random.default_rng(4), 1e-3, spacing="uniform")
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
    continuous = ddpm.em_vp(m, (7, 5), np.random.default_rng(4), steps=50, denoise=False)
    assert np.max(np.abs(continuous - got)) > 1e-6         # the two conversions do differ


def test_discrete_denoising_step_uses_the_chain():
    m = model()
    before = ddpm.em_vp(m, (7, 5), np.random.default_rng(4), steps=20, denoise=False, score_std="discrete",
                        schedule=SCHED)
    got = ddpm.em_vp(m, (7, 5), np.random.default_rng(4), steps=20, score_std="discrete", schedule=SCHED)
    ab = SCHED.alpha_bars[0]                                 # t = 1e-3 = 1 / N: step 0
    want = (before - np.sqrt(1 - ab) * m.forward(before, np.full(7, T_MIN))) / np.sqrt(ab)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_score_std_must_be_known():
    with pytest.raises(ValueError, match="score_std must be one of"):
        ddpm.em_vp(model(), (2, 5), np.random.default_rng(0), steps=2, score_std="exact")
