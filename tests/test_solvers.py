"""refdiff.solvers against oracles: a one-image data set, DDIM, Gaussian data whose
probability-flow map is known in closed form, and the samplers' orders of convergence."""
import math

import numpy as np
import pytest

from refdiff import solvers as S
from refdiff.ddpm import ddim
from refdiff.nn.mlp import ScoreMLP
from refdiff.sde import VE, VP, DDPMSchedule

X_STAR = np.array([[0.7, -0.4, 0.1]])                  # the one-image data set, D = 3


def point_score(sde, x_star):
    """Exact score of the data set {x_star}: p_t = N(gamma_t x_star, std_t^2 I)."""
    def score_fn(x, t):
        gamma, std = sde.marginal_coeffs(np.asarray(t, dtype=float))
        return -(x - gamma[:, None] * x_star) / std[:, None] ** 2
    return score_fn


def gaussian_score(sde, m, c):
    """Exact score of data N(m, c^2 I)."""
    def score_fn(x, t):
        gamma, std = sde.marginal_coeffs(np.asarray(t, dtype=float))
        return -(x - gamma[:, None] * m) / (gamma[:, None] ** 2 * c ** 2 + std[:, None] ** 2)
    return score_fn


def flow_end(sde, x_T, m, c, t_min):
    """The exact probability-flow map T -> t_min for data N(m, c^2): the standardised value
    (x - gamma_t m) / sqrt(gamma_t^2 c^2 + std_t^2) is constant along the flow."""
    (g0, s0), (g1, s1) = (sde.marginal_coeffs(np.float64(t)) for t in (sde.T, t_min))
    return g1 * m + (x_T - g0 * m) * math.sqrt((g1 ** 2 * c ** 2 + s1 ** 2) / (g0 ** 2 * c ** 2 + s0 ** 2))


# --- oracle: a one-image data set ------------------------------------------------------------------------
@pytest.mark.parametrize("sde", [VP(), VE(0.01, 5.0)], ids=["vp", "ve"])
def test_ode_samplers_return_the_one_image(sde):
    # With the exact score of {x*} the data prediction is x* at every t, so each ODE sampler
    # follows the exact flow x_t = gamma_t x* + std_t n: DPM-Solver++ and RK45 land on
    # gamma x* + std n at t_min (DPM-Solver++'s update is exact for a constant x0_hat: rounding
    # only; RK45 to its tolerance), EDM at sigma = 0, i.e. on x* itself (its ODE is linear
    # in sigma there: Euler and Heun are exact).
    rng, shape, t_min = np.random.default_rng(0), (8, 3), 1e-3
    x_T = sde.prior_sample(shape, rng)
    sf = point_score(sde, X_STAR)
    (g0, s0), (g1, s1) = (sde.marginal_coeffs(np.float64(t)) for t in (sde.T, t_min))
    expect = g1 * X_STAR + s1 * (x_T - g0 * X_STAR) / s0
    for order in (1, 2):
        out = S.dpm_solver_pp(sde, sf, shape, 7, None, t_min=t_min, order=order, x_T=x_T)
        np.testing.assert_allclose(out, expect, rtol=0, atol=1e-12)
    out = S.rk45_ode(sde, sf, shape, x_T=x_T, t_min=t_min, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(out, expect, rtol=0, atol=1e-6)
    for churn in (0.0, 40.0):
        out = S.edm_sampler(sde, sf, shape, 6, np.random.default_rng(1), t_min=t_min, s_churn=churn, x_T=x_T)
        np.testing.assert_allclose(out, np.broadcast_to(X_STAR, shape), rtol=0, atol=1e-9)


def test_reverse_sde_solvers_return_the_one_image():
    # The reverse SDE of {x*} ends at N(gamma x*, std^2) at t_min = 1e-5, std = 1e-3; the
    # samplers' error adds to that. Bound: 0.01 (10 std) per coordinate.
    sde, rng = VP(), np.random.default_rng(2)
    out = S.reverse_heun(sde, point_score(sde, X_STAR), (64, 3), 200, rng)
    assert np.max(np.abs(out - X_STAR)) < 0.01


def eps_oracle(schedule, x_star):
    """An eps-model whose x0 prediction is exactly x_star on the DDPM chain:
    eps = (x - sqrt(abar) x*) / sqrt(1 - abar)."""
    class Oracle:
        name, kind, dtype = "oracle", "eps", np.dtype(np.float64)
        from refdiff.backend import get_ops
        ops = get_ops(None)

        def forward(self, x, t):
            i = np.round(np.asarray(t) * schedule.num_steps).astype(int) - 1
            ab = schedule.alpha_bars[i][:, None]
            return (x - np.sqrt(ab) * x_star) / np.sqrt(1 - ab)
    return Oracle()


def test_dpm_solver_ddpm_returns_the_one_image():
    schedule = DDPMSchedule()
    out = S.dpm_solver_pp_ddpm(eps_oracle(schedule, X_STAR), schedule, (5, 3), np.random.default_rng(3), steps=10)
    np.testing.assert_allclose(out, np.broadcast_to(X_STAR, (5, 3)), rtol=0, atol=1e-10)


# --- DPM-Solver++ at first order is DDIM ----------------------------------------------------------------
@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_dpm_solver_first_order_is_ddim(kind):
    # Same model (random float64 MLP), same subsequence, same single draw: DDIM's eq. 12 and
    # DPM-Solver++'s first-order update are one formula, so only rounding separates them.
    schedule = DDPMSchedule(kind=kind)
    model = ScoreMLP(dim=3, widths=(16,), dtype=np.float64, seed=1)
    a = ddim(model, schedule, (6, 3), np.random.default_rng(4), steps=10)
    b = S.dpm_solver_pp_ddpm(model, schedule, (6, 3), np.random.default_rng(4), steps=10, order=1)
    np.testing.assert_allclose(b, a, rtol=0, atol=1e-10)
    c = S.dpm_solver_pp_ddpm(model, schedule, (6, 3), np.random.default_rng(4), steps=10, order=2)
    assert np.max(np.abs(c - a)) > 1e-4          # order 2 is a different method


# --- determinism and order ---------------------------------------------------------------------------------
def _observed_order(errors, steps):
    return -np.polyfit(np.log(steps), np.log(errors), 1)[0]


def test_edm_deterministic_and_second_order():
    # Gaussian data N(m, c^2), exact score. In EDM's scaled state the flow keeps
    # (x^ - m) / sqrt(c^2 + sigma^2): from x^_0 = sigma_0 x_T it reaches sigma_min exactly, and the
    # method's last step (Euler to sigma = 0, i.e. x^ -> D(x^; sigma_min)) is applied to that exact
    # state, so what remains is the Heun steps' global error. Heun is second order: the fitted slope
    # of log error against log N over N = 32..128 must be 2 +- 0.15 (measured 2.07; the
    # pre-asymptotic slope at N = 8..16 is 2.35, and first order would give 1).
    sde, m, c = VP(), 0.5, 0.3
    sf, rng = gaussian_score(sde, m, c), np.random.default_rng(5)
    x_T = sde.prior_sample((200, 1), rng)
    sig0, smin = 80.0, S._sigma_of_t(sde, 1e-3)                  # sigma_max = 80 < sigma(T) = 152
    x_min = m + (sig0 * x_T - m) * math.sqrt(c * c + smin ** 2) / math.sqrt(c * c + sig0 ** 2)
    exact = m + (x_min - m) * c * c / (c * c + smin ** 2)
    steps, errs = [32, 64, 128], []
    for N in steps:
        out = S.edm_sampler(sde, sf, (200, 1), N, np.random.default_rng(N), x_T=x_T)
        again = S.edm_sampler(sde, sf, (200, 1), N, np.random.default_rng(N + 1), x_T=x_T)
        assert np.array_equal(out, again)                         # s_churn = 0: no draw at all
        errs.append(np.max(np.abs(out - exact)))
    assert abs(_observed_order(errs, steps) - 2) < 0.15, errs


def test_dpm_solver_second_order():
    # The same measurement for DPM-Solver++(2M) (multistep: second order, Lu et al. 2022b thm. 3.1)
    # and order=1 (DDIM: first order), against the exact flow to t_min, on the logSNR grid.
    # Measured slopes over N = 32..128: 1.98 and 0.98; 0.15 keeps the other order out.
    sde, m, c, t_min = VP(), 0.5, 0.3, 1e-3
    sf = gaussian_score(sde, m, c)
    x_T = sde.prior_sample((200, 1), np.random.default_rng(6))
    exact = flow_end(sde, x_T, m, c, t_min)
    steps = [32, 64, 128]
    for order in (1, 2):
        errs = [np.max(np.abs(S.dpm_solver_pp(sde, sf, (200, 1), N, None, order=order, x_T=x_T) - exact))
                for N in steps]
        assert abs(_observed_order(errs, steps) - order) < 0.15, (order, errs)


def test_rk45_tolerance_controls_error_and_reports_nfe():
    sde, m, c, t_min = VP(), 0.5, 0.3, 1e-3
    sf = gaussian_score(sde, m, c)
    x_T = sde.prior_sample((50, 1), np.random.default_rng(7))
    exact = flow_end(sde, x_T, m, c, t_min)
    (lo, nfe_lo), (hi, nfe_hi) = (S.rk45_ode(sde, sf, (50, 1), x_T=x_T, rtol=tol, atol=tol, return_nfe=True)
                                  for tol in (1e-3, 1e-7))
    assert np.max(np.abs(hi - exact)) < 1e-5 < np.max(np.abs(lo - exact))
    assert nfe_hi > nfe_lo > 0 and (nfe_lo - 2) % 6 == 0        # RK45: 6 evaluations a step, +2 to start


def test_reverse_heun_matches_gaussian_moments():
    # Gaussian data N(m, c^2): the samples' mean and variance within 4 standard errors
    # (SE of the mean c / sqrt(n), of the variance c^2 sqrt(2 / n)) plus the solver's bias,
    # which at 100 steps is below 1e-3 (benchmarks/solver_order.py measures its order).
    sde, m, c, n = VP(), 0.5, 0.3, 20000
    out = S.reverse_heun(sde, gaussian_score(sde, m, c), (n, 1), 100, np.random.default_rng(8))
    assert abs(out.mean() - m) < 4 * c / math.sqrt(n) + 1e-3
    assert abs(out.var() - c * c) < 4 * c * c * math.sqrt(2 / n) + 1e-3


def test_heun_step_is_exact_on_linear_drift_to_second_order():
    # dx = -x dt (no noise): one Heun step is the 2nd-order Taylor polynomial of e^{-h}.
    x, h = np.array([1.0]), 0.1
    out = S.stochastic_heun_step(lambda y, t: -y, lambda y, t: 0.0, x, 0.0, h, 0.0)
    assert out[0] == pytest.approx(1 - h + h * h / 2, abs=1e-15)


# --- bad input -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("call,msg", [
    (lambda sde, sf: S.rk45_ode(sde, sf, (2, 3), 10, np.random.default_rng(0)), "adaptive"),
    (lambda sde, sf: S.rk45_ode(sde, sf, (2, 3), rng=np.random.default_rng(0), rtol=0.0), "rtol"),
    (lambda sde, sf: S.dpm_solver_pp(sde, sf, (2, 3), 10, np.random.default_rng(0), order=3), "order"),
    (lambda sde, sf: S.dpm_solver_pp(sde, sf, (2, 3), 0, np.random.default_rng(0)), "steps"),
    (lambda sde, sf: S.edm_sampler(sde, sf, (2, 3), 5, None, x_T=np.zeros((3, 3))), "x_T"),
    (lambda sde, sf: S.edm_sampler(sde, sf, (2, 3), 5, np.random.default_rng(0), s_churn=-1), "s_churn"),
    (lambda sde, sf: S.reverse_heun(sde, sf, (2, 3), 5, np.random.default_rng(0), t_min=0.0), "t_min"),
    (lambda sde, sf: S.time_grid(sde, 5, 1e-3, spacing="cubic"), "spacing"),
])
def test_bad_arguments(call, msg):
    sde = VP()
    with pytest.raises(ValueError, match=msg):
        call(sde, point_score(sde, X_STAR))


def test_strong_orders_on_geometric_brownian_motion():
    # dX = 2 X dt + X dW, X_0 = 1, X_1 = exp(1.5 + W_1) exactly (Higham 2001): 3000 paths on
    # N = 16..128 steps of the same Brownian path. EM's strong order is 1/2, stochastic Heun's
    # (on the Stratonovich drift 1.5 x) 1 (benchmarks/solver_order.py measures 0.53 and 0.99
    # with 40,000 paths); 0.2 separates the two and covers this sample's noise (slopes move by
    # < 0.05 between seeds at 3000 paths).
    rng, F, Ns = np.random.default_rng(9), 128, [16, 32, 64, 128]
    dW = math.sqrt(1 / F) * rng.standard_normal((3000, F))
    exact = np.exp(1.5 + dW.sum(1))
    for step, drift, order in ((S.em_step, 2.0, 0.5), (S.stochastic_heun_step, 1.5, 1.0)):
        errs = []
        for N in Ns:
            inc, x = dW.reshape(3000, N, F // N).sum(2), np.ones(3000)
            for k in range(N):
                x = step(lambda y, t: drift * y, lambda y, t: y, x, k / N, (k + 1) / N, inc[:, k])
            errs.append(np.mean(np.abs(x - exact)))
        assert abs(_observed_order(errs, Ns) - order) < 0.2, (order, errs)


# --- from a checkpoint -------------------------------------------------------------------------------------
@pytest.mark.parametrize("sampler,nfe", [("dpm2m", 5), ("edm", 9), ("edm-sde", 9), ("heun-sde", 11), ("rk45", None)])
def test_sample_from_checkpoint(sampler, nfe):
    model = ScoreMLP(dim=4, widths=(8,), dtype=np.float64, seed=2)
    steps = None if sampler == "rk45" else 5
    x, k = S.sample_from_checkpoint(model, {"image_shape": [1, 2, 2]}, 5, np.random.default_rng(0), sampler=sampler,
                                    steps=steps, batch=3, rtol=1e-3, atol=1e-3)
    assert x.shape == (5, 1, 2, 2) and np.all(np.isfinite(x))
    assert k == nfe if nfe is not None else k > 0


@pytest.mark.parametrize("sampler", ["edm", "edm-sde", "rk45", "heun-sde"])
def test_continuous_samplers_refuse_a_cosine_chain(sampler):
    # A cosine DDPM chain has no VP SDE limit: the continuous samplers cannot run on it (dpm2m can).
    model = ScoreMLP(dim=4, widths=(8,), dtype=np.float64)
    meta = {"ddpm_schedule": {"kind": "cosine", "num_steps": 1000}}
    with pytest.raises(ValueError, match="continuous-time model"):
        S.sample_from_checkpoint(model, meta, 2, np.random.default_rng(0), sampler=sampler)
    x, _ = S.sample_from_checkpoint(model, meta, 2, np.random.default_rng(0), sampler="dpm2m", steps=4)
    assert x.shape == (2, 4)
    with pytest.raises(ValueError, match="sampler"):
        S.sample_from_checkpoint(model, meta, 2, np.random.default_rng(0), sampler="euler")


# --- a run directory, from a real (tiny) checkpoint ----------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_checkpoints(tmp_path_factory):
    from tests.tiny_eps_checkpoint import make
    root = tmp_path_factory.mktemp("ck")
    return make(root) + (root,)


def test_sample_to_dir_and_inpaint(tiny_checkpoints):
    import json
    from refdiff.generate import SampleConfig, sample_to_dir
    path, cosine, root = tiny_checkpoints
    info = sample_to_dir(SampleConfig(checkpoint=path, n=3, sampler_args=dict(sampler="dpm2m", steps=4)),
                           str(root / "dpm"))
    assert info["nfe"] == 4 and np.load(root / "dpm" / "samples.npy").shape == (3, 1, 28, 28)
    assert json.load(open(root / "dpm" / "sample.json"))["sampler"] == "dpm2m"
    images = np.random.default_rng(0).uniform(-1, 1, (4, 1, 28, 28)).astype(np.float32)
    mask = np.zeros((1, 28, 28))
    mask[:, :14] = 1                                                   # top half known
    np.save(root / "images.npy", images), np.save(root / "mask.npy", mask)
    sample_to_dir(SampleConfig(checkpoint=path, n=2, sampler_args=dict(sampler="em", steps=10)), str(root / "inp"),
                    inpaint_mask=str(root / "mask.npy"), inpaint_from=str(root / "images.npy"))
    out = np.load(root / "inp" / "samples.npy")
    assert out.shape == (2, 1, 28, 28) and np.array_equal(out[:, :, :14], images[:2, :, :14])
    np.save(root / "bad-mask.npy", mask[:, :20])
    with pytest.raises(ValueError, match="mask"):
        sample_to_dir(SampleConfig(checkpoint=path, n=2, sampler_args=dict(sampler="em", steps=5)),
                        str(root / "inp2"), inpaint_mask=str(root / "bad-mask.npy"),
                        inpaint_from=str(root / "images.npy"))
    with pytest.raises(ValueError, match="continuous-time model"):
        sample_to_dir(SampleConfig(checkpoint=cosine, n=2, sampler_args=dict(sampler="edm", steps=3)),
                        str(root / "cos"))


# --- the command line ----------------------------------------------------------------------------------------
def _cli(argv):
    """refdiff.cli.main(argv) -> (exit code, stderr)."""
    import contextlib
    import io
    from refdiff.cli import main
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(argv)
    return code, err.getvalue()


def test_cli_new_samplers_and_inpaint(tiny_checkpoints):
    path, cosine, root = tiny_checkpoints
    code, err = _cli(["sample", "--checkpoint", path, "--sampler", "dpm2m", "--steps", "4", "--n", "2",
                      "--out", str(root / "cli-dpm")])
    assert code == 0, err
    assert np.load(root / "cli-dpm" / "samples.npy").shape == (2, 1, 28, 28)
    images = np.random.default_rng(1).uniform(-1, 1, (3, 1, 28, 28)).astype(np.float32)
    np.save(root / "cli-images.npy", images)
    mask = np.zeros((1, 28, 28))
    mask[:, :14] = 1
    np.save(root / "cli-mask.npy", mask)
    code, err = _cli(["sample", "--checkpoint", path, "--sampler", "em", "--steps", "5", "--n", "3",
                      "--inpaint", str(root / "cli-mask.npy"), "--from", str(root / "cli-images.npy"),
                      "--out", str(root / "cli-inp")])
    assert code == 0, err
    assert np.array_equal(np.load(root / "cli-inp" / "samples.npy")[:, :, :14], images[:, :, :14])


@pytest.mark.parametrize("case,msg", [
    ("cosine-edm", "continuous-time model"),
    ("mask-shape", "mask must have the shape"),
    ("mask-values", "only 0"),
    ("inpaint-alone", "go together"),
    ("rk45-steps", "adaptive"),
    ("ddim-flag", "belong to the ddpm, ddim and em samplers"),
])
def test_cli_bad_input_is_one_line_exit_2(tiny_checkpoints, case, msg):
    path, cosine, root = tiny_checkpoints
    np.save(root / "imgs.npy", np.zeros((2, 1, 28, 28), dtype=np.float32))
    np.save(root / "mask-shape.npy", np.ones((1, 27, 28)))
    np.save(root / "mask-values.npy", np.full((1, 28, 28), 0.5))
    out = ["--out", str(root / f"bad-{case}")]
    argv = {
        "cosine-edm": ["sample", "--checkpoint", cosine, "--sampler", "edm", "--steps", "3"],
        "mask-shape": ["sample", "--checkpoint", path, "--sampler", "em", "--inpaint", str(root / "mask-shape.npy"),
                       "--from", str(root / "imgs.npy"), "--n", "2"],
        "mask-values": ["sample", "--checkpoint", path, "--sampler", "em", "--inpaint",
                        str(root / "mask-values.npy"), "--from", str(root / "imgs.npy"), "--n", "2"],
        "inpaint-alone": ["sample", "--checkpoint", path, "--sampler", "em", "--inpaint", str(root / "mask-shape.npy")],
        "rk45-steps": ["sample", "--checkpoint", path, "--sampler", "rk45", "--steps", "10"],
        "ddim-flag": ["sample", "--checkpoint", path, "--sampler", "edm", "--eta", "0.5"],
    }[case] + out
    code, err = _cli(argv)
    assert code == 2 and msg in err and "Traceback" not in err and err.strip().count("\n") == 0, err
