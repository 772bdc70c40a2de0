"""DDPM: forward noising, the simple loss, training on a fixed batch, and every sampler
against an ORACLE: for a one-image data set x0 the true noise is known in closed form,
eps*(x_t, t) = (x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t), so each sampler must return x0.

Tolerances:
- Final images of ancestral / DDIM / em_vp (with its Tweedie step): the last update is,
  with the oracle, algebraically x0 whatever x_t is (Ho et al. eq. 11 at i = 0 with
  1 - abar_0 = beta_0; DDIM with abar_{-1} = 1; Tweedie's formula). So only float64
  rounding remains: a few ulps of |x| <= ~5 -> ~1e-14; TOL[float64] (atol 1e-12, rtol 1e-10)
  leaves 100x margin, and a wrong coefficient errs by >= beta_0 = 1e-4.
- Because that last step forgives everything before it, the path is checked too:
  * DDIM eta = 0 is deterministic: x_j = sqrt(abar_j) x0 + sqrt(1 - abar_j) eps_T exactly
    (the oracle's eps never changes): TOL[float64].
  * ancestral beta_tilde and DDIM eta = 1 sample the exact posterior q(x_j | x_i, x0), so
    every state is N(sqrt(abar_j) x0, (1 - abar_j) I) (up to the prior being N(0, I) instead
    of q(x_{N-1} | x0): a mean offset of sqrt(abar_{N-1}) |x0| < 0.007, contracted after).
    The standardised residual r over M = 64,000 draws must have |mean r| <= 5/sqrt(M) + 0.007
    and |var r - 1| <= 5 sqrt(2/M) (5 standard errors, fixed seed).
  * em_vp follows the reverse SDE with Euler-Maruyama: same check on VP's marginals plus a
    bias allowance of 0.05 in the variance: EM's local error is O(beta(t) dt) <= 20 * 1e-3
    = 0.02 per step at 1,000 steps (measured: at most 0.021); a wrong sign or a missing
    factor 2 on g^2 s moves the variance by O(1).
"""
import numpy as np
import pytest

from refdiff import ddpm
from refdiff.backend import REFERENCE
from refdiff.nn import make_model
from refdiff.sde import VP, DDPMSchedule
from tests.helpers import TOL, assert_close

F64 = TOL[np.dtype(np.float64)]
SCHED = DDPMSchedule()
N = SCHED.num_steps


class Oracle:
    """The exact noise predictor for the one-image data set {x0}; abar_fn maps the model
    time it is given to abar (the discrete chain's or the VP SDE's)."""

    kind, name, dtype, ops = "eps", "oracle", np.dtype(np.float64), REFERENCE

    def __init__(self, x0, abar_fn):
        self.x0, self.abar_fn, self.input_shape, self.config = x0, abar_fn, x0.shape, {}
        self.times = []

    def forward(self, x, t):
        self.times.append(float(np.asarray(t)[0]))
        ab = self.abar_fn(np.asarray(t, dtype=np.float64)).reshape((-1,) + (1,) * (x.ndim - 1))
        return (x - np.sqrt(ab) * self.x0) / np.sqrt(1 - ab)


def discrete_abar(t):
    i = np.rint(t * N).astype(int) - 1
    assert np.allclose(t, (i + 1) / N, rtol=0, atol=1e-12), "the chain must feed t = (i+1)/N"
    return SCHED.alpha_bars[i]


def vp_abar(t):
    return np.exp(2 * VP().log_gamma(t))


X0 = np.random.default_rng(1).uniform(-1, 1, (1, 8, 8))   # in [-1, 1], so clip=True changes nothing
SHAPE = (1000, 1, 8, 8)


def check_marginals(states, abars, bias=0.0, skip=()):
    """states[k] ~ N(sqrt(abars[k]) X0, (1 - abars[k]) I) within 5 standard errors (+ bias)."""
    m = states[0].size
    for k, (x, ab) in enumerate(zip(states, abars)):
        if k in skip or ab >= 1:
            continue
        r = (x - np.sqrt(ab) * X0) / np.sqrt(1 - ab)
        assert abs(r.mean()) <= 5 / np.sqrt(m) + 0.007, f"state {k}: mean {r.mean():.4f}"
        assert abs(r.var() - 1) <= 5 * np.sqrt(2 / m) + bias, f"state {k} (abar {ab:.4g}): var {r.var():.4f}"


# --- forward process and loss --------------------------------------------------------------------------
def test_forward_chain_matches_closed_form():
    """Run q(x_i | x_{i-1}) = N(sqrt(alpha_i) x_{i-1}, beta_i) step by step for 20,000 draws;
    at several i the empirical mean/variance match schedule.marginal (Ho et al. eq. 4),
    which is what ddpm_loss noises with. 5 standard errors."""
    rng = np.random.default_rng(0)
    x0 = np.array([-1.0, -0.3, 0.4, 1.0])
    x = np.tile(x0, (20000, 1))
    for i in range(N):
        x = np.sqrt(SCHED.alphas[i]) * x + np.sqrt(SCHED.betas[i]) * rng.standard_normal(x.shape)
        if i in (0, 9, 99, 499, 999):
            mean, std = SCHED.marginal(x0[None], np.array([i]))
            var = std.item() ** 2
            se_mean, se_var = np.sqrt(var / len(x)), var * np.sqrt(2 / len(x))
            assert np.all(np.abs(x.mean(0) - mean[0]) <= 5 * se_mean), i
            assert np.all(np.abs(x.var(0) - var) <= 5 * se_var), i


class Recorder:
    """A stand-in model: eps_theta = 0.3 x (anything fixed would do); keeps what it sees."""

    kind, name, dtype, ops, config = "eps", "recorder", np.dtype(np.float64), REFERENCE, {"dim": 6}

    def forward(self, x, t):
        self.x, self.t = x.copy(), t.copy()
        return 0.3 * x

    def backward(self, dy):
        self.dy = dy
        return 0.3 * dy


def test_ddpm_loss_value_inputs_and_gradient():
    """Replays the rng: i ~ U{0..N-1}, eps ~ N(0, I); checks x_t, t = (i+1)/N, the loss
    (mean over batch and pixels) and d loss / d eps_theta = 2 (pred - eps) / (B D)."""
    x0 = np.random.default_rng(2).uniform(-1, 1, (5, 6))
    m = Recorder()
    loss = ddpm.ddpm_loss(m, SCHED, x0, np.random.default_rng(7))
    r = np.random.default_rng(7)
    i = r.integers(0, N, size=5)
    eps = r.standard_normal(x0.shape)
    ab = SCHED.alpha_bars[i][:, None]
    xt = np.sqrt(ab) * x0 + np.sqrt(1 - ab) * eps
    assert_close(m.x, xt, **F64, name="x_t")
    assert_close(m.t, (i + 1) / N, **F64, name="model time")
    assert_close(loss, np.mean((0.3 * xt - eps) ** 2), **F64, name="loss")
    assert_close(m.dy, 2 * (0.3 * xt - eps) / xt.size, **F64, name="dL/dpred")


def test_ddpm_loss_rejects_bad_input():
    m = Recorder()
    with pytest.raises(ValueError, match="NaN or Inf"):
        ddpm.ddpm_loss(m, SCHED, np.full((2, 6), np.nan), np.random.default_rng(0))
    with pytest.raises(ValueError, match="shape"):
        ddpm.ddpm_loss(m, SCHED, np.zeros(6), np.random.default_rng(0))


def test_training_lowers_loss_on_a_fixed_batch():
    """100 Adam steps of ddpm_loss on 32 fixed 16-d 'images': the loss at fixed draws (seed
    123) falls by more than a third (measured: 1.02 -> 0.21). An untrained net or a wrong
    gradient sign does not."""
    from refdiff.optim import Adam

    model = make_model("mlp", dim=16, widths=(64, 64), dtype=np.float64, seed=0)
    x0 = np.random.default_rng(3).uniform(-1, 1, (32, 16))
    opt, rng = Adam(model, lr=3e-3), np.random.default_rng(4)

    def fixed_loss():
        loss = ddpm.ddpm_loss(model, SCHED, x0, np.random.default_rng(123))
        model.zero_grad()
        return loss

    before = fixed_loss()
    for _ in range(100):
        model.zero_grad()
        ddpm.ddpm_loss(model, SCHED, x0, rng)
        opt.step()
    after = fixed_loss()
    assert after < 0.67 * before, (before, after)


# --- samplers against the oracle --------------------------------------------------------------------------
@pytest.mark.parametrize("variance", ["beta", "beta_tilde"])
def test_ancestral_oracle(variance):
    m = Oracle(X0, discrete_abar)
    x, traj = ddpm.ancestral(m, SCHED, SHAPE, np.random.default_rng(0), variance=variance,
                             return_trajectory=True, frames=21, batch=SHAPE[0])
    assert_close(x, np.broadcast_to(X0, SHAPE), **F64, name="final")
    assert m.times == [(i + 1) / N for i in reversed(range(N))]       # one call per step, t = (i+1)/N
    ks = np.round(np.linspace(0, N, 21)).astype(int)                 # state k = x_{N-1-k}
    abars = [SCHED.alpha_bars[N - 1 - k] if k < N else 1.0 for k in ks]
    assert traj.shape == (21,) + SHAPE
    # beta_tilde: exact posterior, every state. beta: larger variance near the end (Ho et al.
    # §3.2: the two are the upper and lower bounds), so only the states where they agree.
    check_marginals(traj, abars, skip=() if variance == "beta_tilde" else range(15, 21))


def test_ancestral_one_step_by_hand():
    """N = 2 and a zero noise predictor: x = (x_T / sqrt(alpha_1) + sigma_1 z) / sqrt(alpha_0),
    with the draws replayed (x_T, then z); sigma_1^2 = beta_1 or (1-abar_0)/(1-abar_1) beta_1."""
    s = DDPMSchedule(2, 0.1, 0.3)

    class Zero(Oracle):
        def forward(self, x, t):
            return np.zeros_like(x)

    for variance in ("beta", "beta_tilde"):
        x = ddpm.ancestral(Zero(X0, None), s, (3, 1, 8, 8), np.random.default_rng(5), variance=variance)
        r = np.random.default_rng(5)
        xT, z = r.standard_normal((3, 1, 8, 8)), r.standard_normal((3, 1, 8, 8))
        var = s.betas[1] if variance == "beta" else (1 - s.alpha_bars[0]) / (1 - s.alpha_bars[1]) * s.betas[1]
        assert_close(x, (xT / np.sqrt(s.alphas[1]) + np.sqrt(var) * z) / np.sqrt(s.alphas[0]), **F64)


def test_ancestral_clip_route_equals_eq11_when_nothing_is_clipped():
    """clip=True goes through x0_hat and the posterior mean (eq. 7): with x0 in [-1, 1] and
    the oracle nothing is clipped, so the result equals eq. 11's, draw for draw."""
    m = Oracle(X0, discrete_abar)
    a = ddpm.ancestral(m, SCHED, (4, 1, 8, 8), np.random.default_rng(0), return_trajectory=True, frames=5)
    b = ddpm.ancestral(m, SCHED, (4, 1, 8, 8), np.random.default_rng(0), clip=True, return_trajectory=True, frames=5)
    assert_close(b[1], a[1], rtol=1e-6, atol=1e-6, name="trajectory")   # float32 frames


@pytest.mark.parametrize("spacing", ["uniform", "quadratic", "trailing"])
def test_ddim_eta0_oracle_is_the_deterministic_path(spacing):
    m = Oracle(X0, discrete_abar)
    x, traj = ddpm.ddim(m, SCHED, (50, 1, 8, 8), np.random.default_rng(0), steps=20, eta=0.0, spacing=spacing,
                        return_trajectory=True)
    tau = ddpm.ddim_timesteps(N, 20, spacing)
    assert_close(x, np.broadcast_to(X0, x.shape), **F64, name="final")
    xT = np.random.default_rng(0).standard_normal((50, 1, 8, 8))
    epsT = (xT - np.sqrt(SCHED.alpha_bars[tau[0]]) * X0) / np.sqrt(1 - SCHED.alpha_bars[tau[0]])
    abars = [SCHED.alpha_bars[j] for j in tau[1:]]
    for k, ab in enumerate(abars):
        assert_close(traj[k + 1], np.sqrt(ab) * X0 + np.sqrt(1 - ab) * epsT, rtol=1e-6, atol=1e-6,
                     name=f"state {k + 1}")                                    # float32 frames


def test_ddim_eta1_oracle_marginals():
    m = Oracle(X0, discrete_abar)
    x, traj = ddpm.ddim(m, SCHED, SHAPE, np.random.default_rng(0), steps=50, eta=1.0, return_trajectory=True,
                        batch=SHAPE[0])
    assert_close(x, np.broadcast_to(X0, SHAPE), **F64, name="final")
    tau = ddpm.ddim_timesteps(N, 50)
    check_marginals(traj[1:], [SCHED.alpha_bars[j] for j in tau[1:]] + [1.0])


def test_ddim_eta1_full_grid_is_ancestral_beta_tilde():
    """Song et al. 2021 §4.1: eta = 1 on all N steps is the DDPM chain with variance
    beta_tilde; with the same rng, draw for draw, for any model (here an untrained MLP)."""
    s = DDPMSchedule(100)
    model = make_model("mlp", dim=64, widths=(32,), dtype=np.float64, seed=0, time_scale=100.0)
    a = ddpm.ancestral(model, s, (6, 64), np.random.default_rng(3), variance="beta_tilde")
    b = ddpm.ddim(model, s, (6, 64), np.random.default_rng(3), steps=100, eta=1.0)
    assert_close(b, a, name="ddim(eta=1) vs ancestral", **TOL["train64"])   # 100 steps of float64 rounding compound


def test_em_vp_oracle():
    m = Oracle(X0, vp_abar)
    x, traj = ddpm.em_vp(m, SHAPE, np.random.default_rng(0), steps=1000, return_trajectory=True, frames=21,
                        batch=SHAPE[0])
    assert_close(x, np.broadcast_to(X0, SHAPE), **F64, name="final (after the Tweedie step)")
    ts = np.linspace(1.0, 1e-3, 1001)                                  # em_vp's uniform grid
    ks = np.round(np.linspace(0, 1001, 21)).astype(int)               # 1,002 states with the Tweedie one
    abars = [vp_abar(ts[k]) if k <= 1000 else 1.0 for k in ks]
    check_marginals(traj, abars, bias=0.05, skip=(20,))


def test_em_vp_is_euler_maruyama_on_the_model_score():
    """em_vp (the backend's em_step op) takes the same steps and draws as the generic
    refdiff.samplers.euler_maruyama with score_fn_from_model."""
    from refdiff.losses import score_fn_from_model
    from refdiff.samplers import euler_maruyama
    model = make_model("mlp", dim=5, widths=(16,), dtype=np.float64, seed=2)
    sde = VP(0.1, 20.0)
    a = ddpm.em_vp(model, (7, 5), np.random.default_rng(4), steps=50, denoise=False)
    b = euler_maruyama(sde, score_fn_from_model(model, sde), (7, 5), 50, np.random.default_rng(4), t_min=1e-3,
                       spacing="uniform")
    assert np.abs(b).max() > 0.1
    assert_close(a, b, name="em_vp vs euler_maruyama", **F64)


def test_chunking_is_the_same_sampler():
    """batch only bounds memory: eta = 0 DDIM gives the same images for any batch size
    when the prior draws are the same (the first chunk's)."""
    m = Oracle(X0, discrete_abar)
    a = ddpm.ddim(m, SCHED, (5, 1, 8, 8), np.random.default_rng(0), steps=10, batch=5)
    b = ddpm.ddim(m, SCHED, (5, 1, 8, 8), np.random.default_rng(0), steps=10, batch=2)
    assert a.shape == b.shape == (5, 1, 8, 8)
    assert_close(b[:2], a[:2], **F64)


# --- schedules and bad input -----------------------------------------------------------------------------
def test_ddim_timesteps():
    assert list(ddpm.ddim_timesteps(1000, 4, "uniform")) == [750, 500, 250, 0]
    assert list(ddpm.ddim_timesteps(1000, 4, "trailing")) == [999, 749, 499, 249]
    q = ddpm.ddim_timesteps(1000, 10, "quadratic")
    assert len(q) == 10 and q[0] in (799, 800)                   # floor(sqrt(0.8 N)^2) up to rounding
    assert np.all(np.diff(q) < 0) and q[-1] == 0
    assert list(ddpm.ddim_timesteps(10, 10, "uniform")) == list(range(9, -1, -1))


@pytest.mark.parametrize("spacing", ["uniform", "linspace", "trailing"])
@pytest.mark.parametrize("num_steps", [1000, 100, 7])
def test_ddim_timesteps_every_step_count(spacing, num_steps):
    """Exactly `steps` distinct indices in [0, N-1] for every step count (float-step arange
    once gave S + 1 trailing indices ending in -1, e.g. N = 1000, S = 61)."""
    for steps in range(1, num_steps + 1):
        if spacing == "uniform" and num_steps % steps:
            continue                     # refused (tests/test_ddim_spacing.py)
        tau = ddpm.ddim_timesteps(num_steps, steps, spacing)
        assert len(tau) == steps == len(set(tau.tolist())), (steps, tau)
        assert tau.min() >= 0 and tau.max() <= num_steps - 1, (steps, tau)
        assert np.all(np.diff(tau) < 0)
        if spacing == "trailing":
            assert tau[0] == num_steps - 1


def test_em_sampler_uses_the_checkpoints_schedule():
    """sample_from_checkpoint's em sampler runs the VP SDE of the recorded chain,
    beta(t) = N beta_{tN}: VP(0.1, 20) for the report's, VP(0.5, 50) for N = 100 from 5e-3 to
    0.5 (here checked through the oracle: the final image is x0 for the right SDE only); a
    cosine chain is refused."""
    assert (ddpm.vp_for_schedule(SCHED).beta_min, ddpm.vp_for_schedule(SCHED).beta_max) == pytest.approx((0.1, 20))
    sched = dict(num_steps=100, beta_start=5e-3, beta_end=0.5)
    sde = ddpm.vp_for_schedule(DDPMSchedule(**sched))
    assert (sde.beta_min, sde.beta_max) == pytest.approx((0.5, 50.0))
    m = Oracle(X0, lambda t: np.exp(2 * sde.log_gamma(t)))
    x = ddpm.sample_from_checkpoint(m, {"ddpm_schedule": sched, "image_shape": list(X0.shape)}, 50,
                                    np.random.default_rng(0), sampler="em", steps=200)
    assert_close(x, np.broadcast_to(X0, x.shape), **F64, name="em with the checkpoint's VP")
    with pytest.raises(ValueError, match="linear DDPM schedule"):
        ddpm.sample_from_checkpoint(m, {"ddpm_schedule": dict(kind="cosine")}, 2, np.random.default_rng(0),
                                    sampler="em")


@pytest.mark.parametrize("call,match", [
    (lambda m: ddpm.ddim(m, SCHED, (2, 1, 8, 8), np.random.default_rng(0), steps=0), "steps"),
    (lambda m: ddpm.ddim(m, SCHED, (2, 1, 8, 8), np.random.default_rng(0), steps=1001), "steps"),
    (lambda m: ddpm.ddim(m, SCHED, (2, 1, 8, 8), np.random.default_rng(0), eta=1.5), "eta"),
    (lambda m: ddpm.ddim(m, SCHED, (2, 1, 8, 8), np.random.default_rng(0), spacing="log"), "spacing"),
    (lambda m: ddpm.ddim(m, SCHED, (2, 1, 8, 8), np.random.default_rng(0), steps=30, spacing="uniform"),
     "does not divide"),
    (lambda m: ddpm.ancestral(m, SCHED, (2, 1, 8, 8), np.random.default_rng(0), variance="big"), "variance"),
    (lambda m: ddpm.ancestral(m, SCHED, (0, 1, 8, 8), np.random.default_rng(0)), "shape"),
    (lambda m: ddpm.ddim(m, SCHED, (2, 1, 8, 8), np.random.default_rng(0), batch=0), "batch"),
    (lambda m: ddpm.ddim(m, SCHED, (2, 1, 8, 8), np.random.default_rng(0), return_trajectory=True, frames=1),
     "frames"),
    (lambda m: ddpm.sample_from_checkpoint(m, {}, 2, np.random.default_rng(0), sampler="ddpm", steps=50),
     "ddim for fewer"),
    (lambda m: ddpm.sample_from_checkpoint(m, {}, 2, np.random.default_rng(0), sampler="heun"), "sampler"),
])
def test_bad_sampler_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call(Oracle(X0, discrete_abar))


def test_sample_from_checkpoint_reshapes_to_the_image_shape():
    model = make_model("mlp", dim=16, widths=(8,), seed=0)
    x = ddpm.sample_from_checkpoint(model, {"image_shape": [1, 4, 4]}, 3, np.random.default_rng(0),
                                    sampler="ddim", steps=3)
    assert x.shape == (3, 1, 4, 4) and np.all(np.isfinite(x))


class Const:
    """eps_theta = c everywhere (float64, on the reference)."""

    kind, name, dtype, ops, config = "eps", "const", np.dtype(np.float64), REFERENCE, {"dim": 6}

    def __init__(self, c):
        self.c = c

    def forward(self, x, t):
        return np.full(x.shape, self.c)


@pytest.mark.parametrize("c, edge", [(-500.0, 1.0), (500.0, -1.0)])
def test_ancestral_clip_clips_x0_hat_to_the_data_range(c, edge):
    """At i = 0 the clipped route returns x0_hat itself (abar_{-1} = 1: the posterior mean's
    x0 coefficient is 1 and x's is 0); a noise prediction of +-500 puts x0_hat far outside
    [-1, 1], so every entry is the clip's edge."""
    s4 = DDPMSchedule(num_steps=4, beta_start=0.1, beta_end=0.5)
    x = ddpm.ancestral(Const(c), s4, (3, 6), np.random.default_rng(0), clip=True)
    np.testing.assert_allclose(x, np.full((3, 6), edge), rtol=0, atol=1e-12)


def test_score_coeffs_of_the_discrete_chain():
    """score_std="discrete": (sqrt(abar_i), sqrt(1 - abar_i)) at i = round(t N) - 1 of the
    schedule given, or of VP's own 1000-step chain (DDPMSchedule's default) without one."""
    s10 = DDPMSchedule(num_steps=10, kind="cosine")
    f = ddpm._score_coeffs(VP(), "discrete", s10)
    assert f(0.3) == (np.sqrt(s10.alpha_bars[2]), np.sqrt(1 - s10.alpha_bars[2]))
    assert f(1.0) == (np.sqrt(s10.alpha_bars[9]), np.sqrt(1 - s10.alpha_bars[9]))
    g = ddpm._score_coeffs(VP(), "discrete", None)
    np.testing.assert_allclose(g(0.5), (np.sqrt(SCHED.alpha_bars[499]), np.sqrt(1 - SCHED.alpha_bars[499])),
                               rtol=1e-12)
    kw = dict(steps=3, score_std="discrete")
    a = ddpm.em_vp(Const(0.3), (2, 6), np.random.default_rng(1), schedule=s10, **kw)
    b = ddpm.em_vp(Const(0.3), (2, 6), np.random.default_rng(1), **kw)
    assert not np.allclose(a, b)                        # the schedule given is the one used


def test_em_vp_trajectory_keeps_every_state_and_the_denoised_one():
    x, traj = ddpm.em_vp(Const(0.3), (2, 6), np.random.default_rng(2), steps=3, return_trajectory=True)
    assert traj.shape == (5, 2, 6)                   # the prior draw, 3 steps, the denoised sample
    np.testing.assert_allclose(traj[-1], x, rtol=1e-6)
    gamma, std = VP().marginal_coeffs(np.float64(1e-3))
    np.testing.assert_allclose(traj[-1], (traj[-2].astype(np.float64) - std * 0.3) / gamma, rtol=1e-5)


def test_more_frames_than_states_keeps_them_all():
    s4 = DDPMSchedule(num_steps=4, beta_start=0.1, beta_end=0.5)
    _, traj = ddpm.ancestral(Const(0.1), s4, (2, 6), np.random.default_rng(3), return_trajectory=True, frames=10)
    assert traj.shape == (5, 2, 6)
