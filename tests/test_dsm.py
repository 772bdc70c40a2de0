"""Denoising score matching (refdiff.losses.dsm)."""
import numpy as np
import pytest

from refdiff import losses
from refdiff.nn import make_model
from refdiff.nn.base import Model
from refdiff.optim import Adam
from refdiff.sde import OU, VE, VP
from tests.helpers import assert_fd, fd_grad, inner


class GaussianScoreModel(Model):
    """eps(x, t) = std_t (x - gamma_t m) / (gamma_t^2 v + std_t^2): the exact noise
    predictor of N(m, v I) data, with m (D,) and log v trainable. DSM must find the data's
    mean and variance."""

    kind = "eps"

    def __init__(self, sde, dim):
        super().__init__("gauss", {}, np.float64, 0, None)
        self.sde = sde
        self.add_param("m", np.zeros(dim))
        self.add_param("logv", np.zeros(1))

    def forward(self, x, t):
        gamma, std = (a[:, None] for a in self.sde.marginal_coeffs(t))
        v = np.exp(self.params["logv"][0])
        den = gamma ** 2 * v + std ** 2
        self._c = (x, gamma, std, v, den)
        return std * (x - gamma * self.params["m"]) / den

    def backward(self, dy):
        x, gamma, std, v, den = self._c
        r = x - gamma * self.params["m"]
        self.grads["m"] += np.sum(-dy * std * gamma / den, axis=0)
        self.grads["logv"] += np.sum(-dy * std * r * gamma ** 2 * v / den ** 2)
        return dy * std / den


@pytest.mark.parametrize("sde", [VP(), OU(5.0), VE(0.01, 4.0)], ids=repr)
def test_dsm_recovers_the_true_score_of_gaussian_data(sde):
    rng = np.random.default_rng(0)
    mu, s = np.array([1.0, -2.0]), 0.5
    model = GaussianScoreModel(sde, 2)
    opt = Adam(model, lr=0.02)
    for k in range(1500):
        model.zero_grad()
        losses.dsm(model, sde, mu + s * rng.standard_normal((256, 2)), rng)
        opt.step()
    m, v = model.params["m"], np.exp(model.params["logv"][0])
    # Adam's final noise with lr 0.02 on a stochastic objective is a few 1e-2; a wrong
    # loss (e.g. eps target sign, missing std) drives m and v far away.
    assert np.allclose(m, mu, atol=0.05), m
    assert v == pytest.approx(s ** 2, rel=0.1)


def test_gaussian_score_model_grads():
    sde, rng = VP(), np.random.default_rng(1)
    model = GaussianScoreModel(sde, 3)
    model.params["m"][:] = rng.standard_normal(3)
    x, t, dy = rng.standard_normal((4, 3)), rng.uniform(0.1, 0.9, 4), rng.standard_normal((4, 3))
    model.zero_grad()
    model.forward(x, t)
    model.backward(dy)
    for k, p in model.params.items():
        assert_fd(model.grads[k], fd_grad(lambda: inner(model.forward(x, t), dy), p), name=k)


@pytest.mark.parametrize("weighting", ["noise", "likelihood", "none"])
def test_dsm_param_grads_match_finite_differences(weighting):
    """Same rng seed -> same t and noise, so the loss is a deterministic function of theta."""
    sde = VP()
    model = make_model("mlp", dim=2, widths=[6], emb_dim=4, temb_dim=3, dtype=np.float64, seed=3)
    x0 = np.random.default_rng(0).standard_normal((5, 2))
    loss = lambda: losses.dsm(model, sde, x0, np.random.default_rng(7), weighting=weighting, t_min=0.05)
    model.zero_grad()
    loss()
    analytic = {k: g.copy() for k, g in model.grads.items()}
    for k, p in model.params.items():
        assert_fd(analytic[k], fd_grad(loss, p), name=k)


def test_dsm_weightings_relate_as_documented():
    """'noise' weighting is T * mean ||eps_theta - z||^2; 'none' divides it by std_t^2."""
    sde = VP()
    model = make_model("mlp", dim=2, dtype=np.float64)
    x0 = np.random.default_rng(0).standard_normal((1, 2))
    a = losses.dsm(model, sde, x0, np.random.default_rng(5), weighting="noise")
    b = losses.dsm(model, sde, x0, np.random.default_rng(5), weighting="none")
    t = np.random.default_rng(5).uniform(1e-5, 1.0, 1)
    _, std = sde.marginal_coeffs(t)
    assert b == pytest.approx(a / std[0] ** 2, rel=1e-10)


def test_dsm_bad_input():
    model = make_model("mlp", dim=2)
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="weighting must be one of"):
        losses.dsm(model, VP(), np.zeros((2, 2)), rng, weighting="snr")
    with pytest.raises(ValueError, match="x0 contains NaN or Inf"):
        losses.dsm(model, VP(), np.array([[np.nan, 0.0]]), rng)
    with pytest.raises(ValueError, match="t_min must lie in"):
        losses.dsm(model, VP(), np.zeros((2, 2)), rng, t_min=2.0)
    with pytest.raises(ValueError, match=r"expects x of shape \(B, 2\)"):
        losses.dsm(model, VP(), np.zeros((2, 3)), rng)
