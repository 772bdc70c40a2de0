"""DDIM with clip=True by value: x0_hat clipped to [-1, 1] and eps recomputed from the clipped
x0_hat (refdiff/ddpm.py:ddim, steps 2 and 4), checked against the two-step path written out by
hand for the exact noise predictor of a one-image data set whose pixels reach +-3, so that the
clip changes x0_hat."""
import numpy as np

from refdiff import ddpm
from tests.test_ddpm import SCHED, Oracle, discrete_abar
from tests.helpers import assert_close

X0 = 3.0 * np.random.default_rng(2).uniform(-1, 1, (1, 8, 8))     # about 2/3 of the pixels outside [-1, 1]


def test_ddim_clip_two_steps_by_hand():
    m = Oracle(X0, discrete_abar)
    shape = (6, 1, 8, 8)
    x, traj = ddpm.ddim(m, SCHED, shape, np.random.default_rng(0), steps=2, eta=0.0, spacing="trailing",
                        clip=True, return_trajectory=True)
    i, k = ddpm.ddim_timesteps(SCHED.num_steps, 2, "trailing")
    assert (i, k) == (999, 499)
    a_i, a_k = SCHED.alpha_bars[i], SCHED.alpha_bars[k]
    xT = np.random.default_rng(0).standard_normal(shape)
    c = np.clip(X0, -1.0, 1.0)                                   # the oracle's x0_hat is X0; clipped
    eps1 = (xT - np.sqrt(a_i) * c) / np.sqrt(1 - a_i)            # eps recomputed from the clipped x0_hat
    x1 = np.sqrt(a_k) * c + np.sqrt(1 - a_k) * eps1
    # the trajectory frames are float32: compare at float32 resolution of values of order |xT| + 3
    assert_close(traj[1], x1, rtol=1e-6, atol=1e-6, name="state after the first step")
    # the last step (to abar = 1) returns x0_hat, clipped again: X0 clipped, not X0
    assert_close(x, np.broadcast_to(c, shape), rtol=1e-12, atol=1e-12, name="final")
    assert np.abs(X0).max() > 2.5 and np.abs(x1 - (np.sqrt(a_k) * X0 + np.sqrt(1 - a_k)
                                                   * (xT - np.sqrt(a_i) * X0) / np.sqrt(1 - a_i))).max() > 0.1


def test_ddim_clip_off_keeps_the_unclipped_path():
    """Without clip the same oracle returns X0 itself (outside [-1, 1]): the clip is what moves it."""
    m = Oracle(X0, discrete_abar)
    x = ddpm.ddim(m, SCHED, (3, 1, 8, 8), np.random.default_rng(0), steps=2, eta=0.0, spacing="trailing")
    assert_close(x, np.broadcast_to(X0, x.shape), rtol=1e-12, atol=1e-12, name="final")
