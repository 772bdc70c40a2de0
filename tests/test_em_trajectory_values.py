"""Values the other tests leave unchecked: Euler-Maruyama's trajectory, and where its (and the
predictor-corrector's and Heun's) final-state check says the divergence happened (Adam's open
upper bounds are with the other bad settings in test_bad_input.py)."""
import numpy as np
import pytest

from refdiff import samplers
from refdiff.sde import VE, VP


def test_euler_maruyama_trajectory_is_every_state():
    sde, steps = VP(0.1, 20.0), 6
    score = lambda x, t: -x                       # noqa: E731  (the score of N(0, I))
    x, traj = samplers.euler_maruyama(sde, score, (5, 2), steps, np.random.default_rng(3),
                                      return_trajectory=True)
    assert traj.shape == (steps + 1, 5, 2) and traj.dtype == np.float64
    # the start is the prior sample (the same draws), the end the result
    np.testing.assert_array_equal(traj[0], sde.prior_sample((5, 2), np.random.default_rng(3)))
    np.testing.assert_array_equal(traj[-1], x)
    assert np.all(np.diff(traj, axis=0) != 0)    # every step moved every entry
    x_only = samplers.euler_maruyama(sde, score, (5, 2), steps, np.random.default_rng(3))
    np.testing.assert_array_equal(x_only, x)


def test_euler_maruyama_names_where_the_state_diverged():
    # the score is 0 on the first step and 1.7e308 (finite) on the second, the last: there
    # g(t)^2 h > 1, so the update overflows and only the final check sees it
    sde, steps = VP(0.1, 20.0), 2
    ts = samplers.time_grid(sde, steps, 1e-3, "squared")
    assert sde.diffusion(ts[1]) ** 2 * (ts[1] - ts[2]) > 1.1
    score = lambda x, t: np.full_like(x, 1.7e308 if t[0] < ts[0] else 0.0)  # noqa: E731
    with pytest.raises(FloatingPointError) as e, np.errstate(over="ignore", invalid="ignore"):
        samplers.euler_maruyama(sde, score, (3, 2), steps, np.random.default_rng(0), t_min=1e-3)
    assert str(e.value).startswith(f"the state contains NaN or Inf at step {steps} (t = 0.001)")


def test_predictor_corrector_names_where_the_state_diverged():
    # as above: a finite but huge score on the last step overflows only the final state
    sde = VP(0.1, 20.0)
    ts = samplers.time_grid(sde, 2, 1e-3, "squared")
    score = lambda x, t: np.full_like(x, 1.7e308 if t[0] < ts[0] else 0.0)  # noqa: E731
    with pytest.raises(FloatingPointError) as e, np.errstate(over="ignore", invalid="ignore"):
        samplers.predictor_corrector(sde, score, (3, 2), 2, np.random.default_rng(0), t_min=1e-3)
    assert str(e.value).startswith("the state contains NaN or Inf at step 2 (t = 0.001)")


def test_probability_flow_heun_names_where_the_state_diverged():
    # one Heun step of VE from T = 1 to 0.5 whose two slopes are each 1.5e308 (finite, and so is
    # the Euler point), but whose average step overflows: only the final check can see it
    sde = VE(0.01, 1e100)
    score = lambda x, t: np.full_like(x, -(1.5e308 / sde.diffusion(t[0]) ** 2) * 2)  # noqa: E731
    with pytest.raises(FloatingPointError) as e, np.errstate(over="ignore", invalid="ignore"):
        samplers.probability_flow_heun(sde, score, (3, 2), 1, np.random.default_rng(0), t_min=0.5)
    assert str(e.value).startswith("the state contains NaN or Inf at step 1 (t = 0.5)")
