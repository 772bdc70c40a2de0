"""The predictor-corrector sampler's Langevin step is score_sde's `LangevinCorrector`
(Song et al. 2021, Alg. 5):

    e = 2 alpha_i (snr mean_b||z_b|| / mean_b||s_b||)^2,   x <- x + e s + sqrt(2 e) z,

alpha_i = 1 - beta_i of the discretised VP chain beta_i = linspace(beta_min/N, beta_max/N, N),
i = int(t (N - 1) / T) for VP and sub-VP, and 1 for VE. One step (steps = 1) is replayed
by hand with the same draws: corrector, then the Euler-Maruyama predictor at t = T with
no noise (the last step). float64, same operations: rtol 1e-12; a missing alpha_i is off
by beta_i = 2 % of e at t = T.
"""
import numpy as np
import pytest

from refdiff import samplers
from refdiff.sde import VE, VP, SubVP

SNR, T_MIN = 0.16, 1e-5


def replay(sde, alpha, shape=(6, 3)):
    rng = np.random.default_rng(3)
    x = sde.prior_sample(shape, rng)
    s = -x                                               # the score passed in: s(x, t) = -x
    z = rng.standard_normal(shape)
    e = 2 * alpha * (SNR * np.mean(np.linalg.norm(z, axis=1)) / np.mean(np.linalg.norm(s, axis=1))) ** 2
    x = x + e * s + np.sqrt(2 * e) * z
    return x - sde.reverse_drift(x, sde.T, -x) * (sde.T - T_MIN)


@pytest.mark.parametrize("sde, alpha", [
    (VP(0.1, 20.0), 1 - 20.0 / 1000),                  # i = N - 1 at t = T: beta_{N-1} = beta_max / N
    (SubVP(0.1, 20.0), 1 - 20.0 / 1000),
    (VE(0.01, 5.0), 1.0),
])
def test_one_corrector_step_is_score_sde(sde, alpha):
    got = samplers.predictor_corrector(sde, lambda x, t: -x, (6, 3), 1, np.random.default_rng(3), T_MIN,
                                       "uniform", snr=SNR, n_corrector=1)
    np.testing.assert_allclose(got, replay(sde, alpha), rtol=1e-12, atol=0)


def test_alpha_indexes_the_discrete_chain_as_score_sde():
    vp = VP(0.1, 20.0)
    betas = np.linspace(0.1 / 1000, 20.0 / 1000, 1000)   # score_sde's VPSDE.discrete_betas, N = 1000
    for t, i in [(1.0, 999), (0.5, 499), (0.2503, 250), (1e-3, 0)]:
        assert samplers.langevin_alpha(vp, t) == pytest.approx(1 - betas[i], rel=1e-15)
    assert samplers.langevin_alpha(VE(), 0.5) == 1.0
