"""Prediction targets (refdiff.prediction): the exact conversions among eps, x0, v and the
score; abar of a model time; the loss of each target; and, for each target, the ORACLE of a
one-image data set {x*} (its exact optimal prediction, in closed form) seen through the
adapter by every sampler.

Oracle of target p at (x, t), with abar = abar_at(schedule, t) (the adapter's convention,
exact on the chain's grid): eps* = (x - sqrt(abar) x*) / sqrt(1 - abar), x0* = x*,
v* = sqrt(abar) eps* - sqrt(1 - abar) x*.

Tolerances (float64):
- Conversions: every map is a few products and sums of values |.| <= ~10 divided by
  a = sqrt(abar) or s = sqrt(1 - abar) >= sqrt(1e-3) = 0.032 (abar is drawn in [1e-3, 1 - 1e-3]):
  a round trip loses at most ~8 ops x 10 x 2.2e-16 / 0.032^2 ~ 2e-11: atol 1e-10 (a wrong
  coefficient errs by >= 1e-3).
- Discrete samplers (ddpm, ddim, dpm2m): their last step is, with the oracle, algebraically
  x* (tests/test_ddpm.py); the adapter adds one conversion per step: atol 1e-10 as
  tests/test_solvers.py's dpm2m oracle test.
- Continuous samplers (em, edm, edm-sde, rk45, heun-sde): they take the VP SDE's std_t, not
  the chain's, so even the eps oracle is only near x* there. Checked two ways: (1) x0 and v
  oracles give the eps oracle's images draw for draw (the adapter is exact: 1e-9, rounding
  carried through up to 1,000 contracting steps, measured 2e-16; rk45: its accepted steps
  react to rounding, so the two runs are two RK45 solutions of one ODE, apart by its global
  error: measured up to 4e-6 at rtol = atol = 1e-7, bound 1e-5, while a wrong conversion
  moves the images by > 1e-3); (2) the images are near x*: the Tweedie end (em, heun-sde, edm
  at sigma = 0) errs by |x - gamma x*| |1 - std_VP / std_chain| <= 5 std x 0.05 = 2.6e-3 at
  t_min = 1e-3 (std_VP = 0.0105 vs the chain's sqrt(1 - abar_0) = 0.0100), when the SDE has
  reached its end marginal (heun-sde at 500 steps; at 100 its own discretisation error adds
  ~0.015): bound 5e-3 (measured <= 2.1e-3); rk45 ends at x_{t_min} = gamma x* + std n with no
  denoising: 6 std = 0.063 (measured <= 0.038).
"""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refdiff import ddpm, prediction as P, solvers
from refdiff.backend import REFERENCE
from refdiff.sde import DDPMSchedule
from tests.helpers import assert_fd, examples, fd_tangent

SCHED = DDPMSchedule()
ATOL = 1e-10


# --- conversions ------------------------------------------------------------------------------------------------
@settings(max_examples=examples(60), deadline=None)
@given(seed=st.integers(0, 2 ** 31 - 1), B=st.integers(1, 4), D=st.integers(1, 5),
       scale=st.sampled_from([1e-3, 1.0, 3.0]))
def test_conversions_are_exact(seed, B, D, scale):
    rng = np.random.default_rng(seed)
    x0, eps = scale * rng.standard_normal((B, D)), rng.standard_normal((B, D))
    abar = rng.uniform(1e-3, 1 - 1e-3, B)
    a, s = np.sqrt(abar)[:, None], np.sqrt(1 - abar)[:, None]
    x = a * x0 + s * eps
    v = a * eps - s * x0                                             # Salimans & Ho's definition, written here
    close = lambda got, want: np.testing.assert_allclose(got, want, rtol=0, atol=ATOL)   # noqa: E731
    close(P.v_from_eps_x0(eps, x0, abar), v)
    close(P.x0_from_eps(x, eps, abar), x0)
    close(P.eps_from_x0(x, x0, abar), eps)
    close(P.eps_from_v(x, v, abar), eps)
    close(P.x0_from_v(x, v, abar), x0)
    close(P.v_from_eps(x, eps, abar), v)
    close(P.v_from_x0(x, x0, abar), v)
    # the score of q(x_t | x0) = N(a x0, s^2 I): -(x - a x0) / s^2 = -eps / s
    close(P.score_from_eps(x, eps, abar), -(x - a * x0) / (1 - abar)[:, None])
    close(P.eps_from_score(x, P.score_from_eps(x, eps, abar), abar), eps)
    for pred, want in (("eps", eps), ("x0", x0), ("v", v)):
        close(P.target_of(pred, x0, eps, abar), want)
        close(P.to_eps(pred, x, want, abar), eps)


def test_conversions_broadcast_over_images():
    rng = np.random.default_rng(0)
    x0, eps, abar = rng.standard_normal((3, 1, 4, 4)), rng.standard_normal((3, 1, 4, 4)), np.array([.1, .5, .9])
    x = np.sqrt(abar)[:, None, None, None] * x0 + np.sqrt(1 - abar)[:, None, None, None] * eps
    np.testing.assert_allclose(P.x0_from_v(x, P.v_from_eps_x0(eps, x0, abar), abar), x0, rtol=0, atol=ATOL)


# --- abar of a model time -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("sched", [SCHED, DDPMSchedule(kind="cosine"), DDPMSchedule(num_steps=7)],
                         ids=["linear", "cosine", "N7"])
def test_abar_on_the_grid_is_the_chains(sched):
    N = sched.num_steps
    t = ddpm.model_time(np.arange(N), N)
    assert np.array_equal(P.abar_at(sched, t), sched.alpha_bars)
    # as a float32 model receives the time (the samplers call the model in its dtype)
    assert np.array_equal(P.abar_at(sched, t.astype(np.float32)), sched.alpha_bars)
    assert P.abar_at(sched, 0.0) == 1.0


def test_abar_between_grid_points_is_log_linear():
    N, i = SCHED.num_steps, np.arange(SCHED.num_steps - 1)
    mid = (i + 1.5) / N                                              # halfway from step i to step i + 1
    np.testing.assert_allclose(P.abar_at(SCHED, mid), np.sqrt(SCHED.alpha_bars[i] * SCHED.alpha_bars[i + 1]),
                               rtol=1e-13)
    first = P.abar_at(SCHED, 0.5 / N)                               # between the clean data (1) and step 0
    np.testing.assert_allclose(first, np.sqrt(SCHED.alpha_bars[0]), rtol=1e-14)
    t = np.linspace(0, 1, 10007)
    assert np.all(np.diff(P.abar_at(SCHED, t)) < 0)                 # decreasing in t
    with pytest.raises(ValueError, match="model times"):
        P.abar_at(SCHED, np.array([0.5, 1.5]))


def test_chain_extension_against_the_vp_sde():
    """The gap refdiff.prediction's docstring quotes between abar_at and the marginal of the VP
    SDE the continuous samplers run (refdiff.ddpm.vp_for_schedule: VP(0.1, 20) for the
    report's chain): std within 4.6 %, sqrt(abar) within 3.3 %, on a fine grid of [1e-5, 1]."""
    from refdiff.sde import VP
    t = np.concatenate([np.linspace(1e-5, 1e-3, 1000), np.linspace(1e-3, 1, 100000)])
    abar, (gamma, std) = P.abar_at(SCHED, t), VP(0.1, 20.0).marginal_coeffs(t)
    assert np.max(np.abs(np.sqrt(1 - abar) / std - 1)) < 0.047
    assert np.max(np.abs(np.sqrt(abar) / gamma - 1)) < 0.034


# --- the loss of each target ---------------------------------------------------------------------------------------
class OracleNet:
    """The exact optimal prediction of target `pred` for the one-image data set {x_star};
    `backward` records the gradient it is given (the loss's d/d output)."""

    name, kind, dtype, ops = "oracle", "eps", np.dtype(np.float64), REFERENCE

    def __init__(self, x_star, pred, schedule=SCHED):
        self.x_star, self.pred, self.schedule = x_star, pred, schedule
        self.input_shape, self.config, self.calls = x_star.shape, {}, 0

    def forward(self, x, t):
        self.calls += 1
        abar = P.abar_at(self.schedule, t)
        eps = P.eps_from_x0(x, np.broadcast_to(self.x_star, x.shape), abar)
        return P.target_of(self.pred, np.broadcast_to(self.x_star, x.shape), eps, abar)

    def backward(self, dy):
        self.dy = dy


X_STAR = np.random.default_rng(1).uniform(-1, 1, (1, 4, 4))


@pytest.mark.parametrize("pred", P.PREDICTIONS)
def test_loss_of_the_oracle_is_zero_and_of_another_target_is_not(pred):
    # the loss's target for x_i built from {x*} is exactly the oracle's output: loss ~ rounding
    # (|target| <= ~1/s ~ 100 at i = 0 for eps: squared error (100 x 1e-15)^2 ~ 1e-26: bound 1e-20)
    x0 = np.broadcast_to(X_STAR, (64,) + X_STAR.shape[1:]).copy()
    loss = ddpm.ddpm_loss(OracleNet(X_STAR, pred), SCHED, x0, np.random.default_rng(0), pred=pred)
    assert 0 <= loss < 1e-20
    other = {"eps": "v", "x0": "eps", "v": "x0"}[pred]
    assert ddpm.ddpm_loss(OracleNet(X_STAR, pred), SCHED, x0, np.random.default_rng(0), pred=other) > 1e-3


def test_eps_loss_is_unchanged_by_the_target_argument():
    """pred="eps" (the default) is the paper's loss, draw for draw: same value as without it."""
    from refdiff.nn import make_model
    x0 = np.random.default_rng(2).uniform(-1, 1, (8, 16))
    m1 = make_model("mlp", dim=16, widths=(8,), dtype=np.float64, seed=0)
    m2 = make_model("mlp", dim=16, widths=(8,), dtype=np.float64, seed=0)
    a = ddpm.ddpm_loss(m1, SCHED, x0, np.random.default_rng(3))
    b = ddpm.ddpm_loss(m2, SCHED, x0, np.random.default_rng(3), pred="eps")
    assert a == b and all(np.array_equal(m1.grads[k], m2.grads[k]) for k in m1.grads)


# --- every sampler returns the one image, for every target -----------------------------------------------------------
META = {"ddpm_schedule": SCHED.config(), "image_shape": list(X_STAR.shape)}
DISCRETE = [("ddpm", dict(variance="beta")), ("ddpm", dict(variance="beta_tilde", clip=True)),
            ("ddim", dict(steps=20)), ("ddim", dict(steps=10, eta=1.0)), ("dpm2m", dict(steps=10))]
CONTINUOUS = [("em", dict(steps=200)), ("edm", dict(steps=12)), ("edm-sde", dict(steps=12)),
              ("rk45", dict(rtol=1e-7, atol=1e-7)), ("heun-sde", dict(steps=500))]


def _sample(model, sampler, kw, n=6, seed=0, meta=META):
    rng = np.random.default_rng(seed)
    if sampler in solvers.CHECKPOINT_SAMPLERS:
        return solvers.sample_from_checkpoint(model, meta, n, rng, sampler=sampler, **kw)[0]
    return ddpm.sample_from_checkpoint(model, meta, n, rng, sampler=sampler, **kw)


@pytest.mark.parametrize("pred", P.PREDICTIONS)
def test_discrete_samplers_return_the_one_image(pred):
    model = P.as_eps(OracleNet(X_STAR, pred), dict(META, prediction=pred))
    assert (model.pred == pred) if pred != "eps" else isinstance(model, OracleNet)
    for sampler, kw in DISCRETE:
        x = _sample(model, sampler, kw)
        np.testing.assert_allclose(x, np.broadcast_to(X_STAR, x.shape), rtol=0, atol=ATOL,
                                   err_msg=f"{sampler} {kw} with the {pred} oracle")


@pytest.mark.parametrize("kind", ["cosine"])
def test_discrete_samplers_on_a_cosine_chain(kind):
    sched = DDPMSchedule(kind=kind)
    meta = dict(META, ddpm_schedule=sched.config())
    for pred in ("x0", "v"):
        model = P.as_eps(OracleNet(X_STAR, pred, sched), dict(meta, prediction=pred))
        for sampler, kw in (("ddim", dict(steps=20)), ("dpm2m", dict(steps=10))):
            x = _sample(model, sampler, kw, meta=meta)
            np.testing.assert_allclose(x, np.broadcast_to(X_STAR, x.shape), rtol=0, atol=ATOL)


def test_continuous_samplers_see_every_target_as_the_eps_oracle():
    eps_oracle = OracleNet(X_STAR, "eps")
    for sampler, kw in CONTINUOUS:
        ref = _sample(eps_oracle, sampler, kw)
        bound = 0.063 if sampler == "rk45" else 5e-3
        assert np.max(np.abs(ref - X_STAR)) < bound, (sampler, np.max(np.abs(ref - X_STAR)))
        for pred in ("x0", "v"):
            x = _sample(P.as_eps(OracleNet(X_STAR, pred), dict(META, prediction=pred)), sampler, kw)
            np.testing.assert_allclose(x, ref, rtol=0, atol=1e-5 if sampler == "rk45" else 1e-9,
                                       err_msg=f"{sampler} with the {pred} oracle")


def test_inpainting_and_likelihood_take_the_adapter():
    """The reverse-SDE inpainting and the likelihood's JVP-capable score run on the adapted
    model: its forward_jvp is the converted network's (checked against a finite difference of
    its forward, which is affine in the direction: central differences are exact up to rounding)."""
    from refdiff.inpaint import inpaint_from_checkpoint
    from refdiff.likelihood import model_score
    from refdiff.sde import VP

    class JvpOracle(OracleNet):
        def forward_jvp(self, x, t, v):
            h = 1e-4
            return self.forward(x, t), (self.forward(x + h * v, t) - self.forward(x - h * v, t)) / (2 * h)

    meta = dict(META, prediction="v")
    model = P.as_eps(JvpOracle(X_STAR, "v"), meta)
    x = np.random.default_rng(0).standard_normal((3,) + X_STAR.shape)
    v = np.random.default_rng(1).standard_normal(x.shape)
    t = np.full(3, 0.37)
    e, de = model.forward_jvp(x, t, v)
    # against central differences of the adapter with the suite's step and derived bound
    # (the oracle's own JVP above is a difference at h = 1e-4: O(h^2) = 1e-8 relative at most)
    assert_fd(de, fd_tangent(lambda z: model.forward(z, t), x, v), "JVP through the v adapter")
    np.testing.assert_allclose(e, OracleNet(X_STAR, "eps").forward(x, t), rtol=0, atol=ATOL)
    sf = model_score(model, VP())
    assert sf(x, t).shape == x.shape
    images = np.broadcast_to(X_STAR, (2,) + X_STAR.shape).copy()
    mask = np.ones(X_STAR.shape)
    mask[..., :2] = 0
    out = inpaint_from_checkpoint(model, meta, images, mask, np.random.default_rng(0), steps=100)
    assert np.max(np.abs(out - images)) < 5e-3          # the oracle completes the image with itself


# --- the checkpoint path ------------------------------------------------------------------------------------------
def _checkpoint_with(tmp_path, **meta):
    from refdiff.checkpoint import save_model
    from refdiff.nn import make_model
    net = make_model("mlp", dim=16, widths=(8,), dtype=np.float64, seed=0)
    path = str(tmp_path / "c.npz")
    save_model(path, net, ddpm_schedule=SCHED.config(), image_shape=[1, 4, 4], **meta)
    return path, net


@pytest.mark.parametrize("pred", P.PREDICTIONS)
def test_load_generator_applies_the_recorded_target(tmp_path, pred):
    from refdiff.generate import load_generator
    path, net = _checkpoint_with(tmp_path, prediction=pred)
    model, meta, info = load_generator(path, use_ema=False)
    assert info["prediction"] == pred
    x, t = np.random.default_rng(0).standard_normal((5, 16)), ddpm.model_time(np.array([0, 10, 300, 700, 999]), 1000)
    raw, abar = net.forward(x, t), SCHED.alpha_bars[[0, 10, 300, 700, 999]]
    want = {"eps": raw, "x0": P.eps_from_x0(x, raw, abar), "v": P.eps_from_v(x, raw, abar)}[pred]
    got = model.forward(x, t)
    if pred == "eps":
        assert model.__class__ is net.__class__ and np.array_equal(got, want)     # untouched
    else:
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)


def test_a_checkpoint_without_a_target_is_eps_and_an_unknown_one_is_refused(tmp_path):
    from refdiff.checkpoint import CheckpointError
    from refdiff.generate import load_generator
    path, net = _checkpoint_with(tmp_path)
    assert load_generator(path)[2]["prediction"] == "eps"
    path, net = _checkpoint_with(tmp_path, prediction="score")
    with pytest.raises(CheckpointError, match="prediction target"):
        load_generator(path)


@pytest.mark.parametrize("bad,match", [("x1", "pred"), (None, "pred"), ("EPS", "pred")])
def test_unknown_prediction_target_is_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        P.check_prediction(bad)
    with pytest.raises(ValueError, match=match):
        ddpm.ddpm_loss(OracleNet(X_STAR, "eps"), SCHED, X_STAR, np.random.default_rng(0), pred=bad)
