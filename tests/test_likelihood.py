"""refdiff.likelihood: the probability-flow log-likelihood against closed forms, quadrature
and the unbiasedness of Hutchinson's trace estimator."""
import math

import numpy as np
import pytest
from scipy.integrate import quad, solve_ivp
from scipy.special import logsumexp
from scipy.stats import multivariate_normal, norm

from refdiff import likelihood as L
from refdiff.data.toy import GaussianMixture
from refdiff.nn.mlp import ScoreMLP
from refdiff.sde import VE, VP, SubVP
from tests.helpers import assert_fd, fd_direction


def gaussian_score(sde, m, c):
    """Exact score of data N(m, c^2 I) diffused by sde: -(x - gamma m) / (gamma^2 c^2 + std^2),
    written here by hand (independent of mixture_score), J v = -v / (gamma^2 c^2 + std^2)."""
    def var(x, t):
        gamma, std = sde.marginal_coeffs(np.broadcast_to(np.asarray(t, float), (x.shape[0],)))
        return gamma[:, None], (gamma ** 2 * c ** 2 + std ** 2)[:, None]

    def score_fn(x, t):
        gamma, v = var(x, t)
        return -(x - gamma * m) / v

    def jvp(x, t, u):
        gamma, v = var(x, t)
        return -(x - gamma * m) / v, -u / v

    score_fn.jvp = jvp
    return score_fn


def mixture_logpdf(gmm, x):
    """The analytic log-density of a GaussianMixture at t = 0, with scipy's normal."""
    return logsumexp([math.log(w) + np.atleast_1d(multivariate_normal(m, c).logpdf(x))
                      for w, m, c in zip(gmm.weights, gmm.means, gmm.covs)], axis=0)


@pytest.mark.parametrize("sde", [VP(), SubVP(), VE(0.01, 5.0)], ids=["vp", "subvp", "ve"])
def test_gaussian_data_closed_form(sde):
    # For Gaussian data the flow is affine: it keeps (x - mu_t) / sqrt(v_t), so x(T) and every
    # term of eq. (1) are known: log p_eps(x) - log p_T(x_T) + prior_logp(x_T). The only error
    # left is RK45's: each of its (< 100) steps keeps a local error below atol + rtol |y| with
    # |y| ~ 10, so at tol 1e-8 the global error is below 100 * 1e-8 * 10 = 1e-5; we allow 1e-4.
    D, m, c, eps = 3, np.array([0.5, -1.0, 0.2]), 0.4, 1e-3
    rng = np.random.default_rng(0)
    x = m + c * rng.standard_normal((16, D))
    logp, nfe = L.log_likelihood(sde, gaussian_score(sde, m, c), x, rng, divergence="exact",
                                 rtol=1e-8, atol=1e-8, t_min=eps)
    (g0, s0), (g1, s1) = (sde.marginal_coeffs(np.float64(t)) for t in (eps, sde.T))
    v0, v1 = g0 ** 2 * c ** 2 + s0 ** 2, g1 ** 2 * c ** 2 + s1 ** 2
    xT = g1 * m + math.sqrt(v1 / v0) * (x - g0 * m)
    expect = (norm(g0 * m, math.sqrt(v0)).logpdf(x).sum(1) - norm(g1 * m, math.sqrt(v1)).logpdf(xT).sum(1)
              + sde.prior_logp(xT))
    np.testing.assert_allclose(logp, expect, rtol=0, atol=1e-4)
    assert nfe > 0


def test_mixture_jvp_is_the_derivative_of_the_mixtures_score():
    # mixture_score's jvp (_mixture_jvp, the closed form) against GaussianMixture.score itself:
    # its s is that score, and u . J v its central difference along v (one scalar per random u),
    # at times across (0, 1]. Milliseconds, where every other test of it solves the ODE.
    gmm, sde, rng = GaussianMixture.default(), VP(), np.random.default_rng(4)
    sf = L.mixture_score(gmm, sde)
    x = gmm.sample(5, rng) * 1.2
    t = np.array([0.01, 0.1, 0.3, 0.6, 1.0])
    v = rng.standard_normal(x.shape)
    s, jv = sf.jvp(x, t, v)
    np.testing.assert_allclose(s, gmm.score(x, t, sde), rtol=1e-12, atol=1e-12)
    for _ in range(3):
        u = rng.standard_normal(x.shape)
        assert_fd(np.sum(u * jv), fd_direction(lambda: np.sum(u * gmm.score(x, t, sde)), x, v),
                  name="u . J v")
    assert sf.vjp is sf.jvp                         # J is the Hessian of log p_t: symmetric


def test_mixture_density_within_0p01_nats_per_dim():
    # The target on GaussianMixture.default(): PF-ODE logp (exact divergence) equals the
    # analytic density to 0.01 nats/dim on average. What separates them besides RK45's error:
    # p_eps vs p_0 (std_eps ~ 1e-3 against components of std 0.15) and p_T vs N(0, I)
    # (gamma_T = 0.0067): both ~1e-4. Measured (benchmarks/gmm_exact_score.py, 1000 points):
    # 3.4e-5 nats/dim; here 200 points to keep the test short.
    gmm, sde, rng = GaussianMixture.default(), VP(), np.random.default_rng(1)
    x = gmm.sample(200, rng)
    logp, _ = L.log_likelihood(sde, L.mixture_score(gmm, sde), x, rng, divergence="exact")
    err = np.abs(logp - mixture_logpdf(gmm, x)) / 2
    assert err.mean() < 0.01


def test_one_dimension_against_quadrature():
    # An independent computation of eq. (1) in 1-D: the trajectory alone from a tight solve_ivp
    # (dense output), then int div f~ dt by scipy's adaptive quad, then the prior. Both sides are
    # accurate to ~1e-7; 1e-5 allows for the joint system's own tolerance (1e-9).
    gmm = GaussianMixture([0.3, 0.7], [[-1.0], [1.5]], [[[0.2]], [[0.05]]])
    sde, eps = VP(), 1e-3
    sf = L.mixture_score(gmm, sde)
    for x0 in (-1.2, 0.1, 1.4):
        x = np.array([[x0]])
        logp, _ = L.log_likelihood(sde, sf, x, None, divergence="exact", rtol=1e-9, atol=1e-9, t_min=eps)

        def f(t, y):
            return sde.probability_flow_drift(y.reshape(1, 1), t, sf(y.reshape(1, 1), np.array([t]))).ravel()
        traj = solve_ivp(f, (eps, 1.0), [x0], rtol=1e-11, atol=1e-11, dense_output=True).sol

        def div(t):
            xt = traj(t).reshape(1, 1)
            _, jv = sf.jvp(xt, np.array([t]), np.ones((1, 1)))
            return -float(sde.a(t)) - 0.5 * float(sde.diffusion(t)) ** 2 * float(jv[0, 0])
        integral, _ = quad(div, eps, 1.0, epsabs=1e-11, limit=200)
        expect = sde.prior_logp(traj(1.0).reshape(1, 1))[0] + integral
        assert abs(logp[0] - expect) < 1e-5
        # and the density the flow defines is the mixture's (within p_eps vs p_0, ~1e-3 here)
        assert abs(logp[0] - mixture_logpdf(gmm, x)[0]) < 0.01


@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
def test_hutchinson_is_unbiased(probe):
    # Mean over 20,000 probes of v^T J v against the exact trace, within 4 standard errors of the
    # mean (the probes are independent: the SE is the sample std / sqrt(P)).
    gmm, sde, rng = GaussianMixture.default(), VP(), np.random.default_rng(2)
    sf = L.mixture_score(gmm, sde)
    x, t = gmm.sample(3, rng) * 0.8, 0.05
    _, exact = L.divergence_exact(sf, x, t)
    P = 20000
    v = L.sample_probes((P,) + x.shape, rng, probe)
    ests = _per_probe(sf, x, t, v)                                      # (P, B)
    se = ests.std(0, ddof=1) / math.sqrt(P)
    assert np.all(np.abs(ests.mean(0) - exact) < 4 * se)
    assert np.allclose(L.divergence_hutchinson(sf, x, t, v)[1], ests.mean(0))


def _per_probe(sf, x, t, v):
    """v_p^T J v_p for each probe separately (P, B), in one batched JVP."""
    P, B = v.shape[:2]
    xs = np.broadcast_to(x[None], v.shape).reshape((P * B,) + x.shape[1:])
    _, jv = sf.jvp(xs, np.full(P * B, t), v.reshape(xs.shape))
    return np.sum(jv * v.reshape(xs.shape), axis=1).reshape(P, B)


def test_hutchinson_log_likelihood_mean_matches_exact():
    # 40 independent runs of one Rademacher probe each: their mean is within 4 SE of the exact run.
    gmm, sde, rng = GaussianMixture.default(), VP(), np.random.default_rng(3)
    sf = L.mixture_score(gmm, sde)
    x = gmm.sample(4, rng)
    exact, _ = L.log_likelihood(sde, sf, x, rng, divergence="exact", rtol=1e-6, atol=1e-6)
    runs = np.stack([L.log_likelihood(sde, sf, x, rng, rtol=1e-6, atol=1e-6)[0] for _ in range(40)])
    se = runs.std(0, ddof=1) / math.sqrt(len(runs))
    assert np.all(np.abs(runs.mean(0) - exact) < 4 * se + 1e-4)
    assert np.all(runs.std(0) > 0)          # the estimator did vary: the check above is not vacuous


def test_model_score_exact_divergence_matches_finite_differences():
    # The model's forward-mode JVP (float64 MLP) against central differences of its score: the
    # trace by FD has error O(h^2 |s'''|) ~ 1e-10 at h = 1e-5, plus rounding eps |s| / h ~ 1e-9.
    sde, rng = VP(), np.random.default_rng(4)
    model = ScoreMLP(dim=3, widths=(16, 16), dtype=np.float64, seed=0)
    sf = L.model_score(model, sde)
    x, t, h = rng.standard_normal((5, 3)), 0.4, 1e-5
    s, tr = L.divergence_exact(sf, x, t)
    fd = sum((sf(x + h * e, np.full(5, t)) - sf(x - h * e, np.full(5, t)))[:, i] / (2 * h)
             for i, e in enumerate(np.eye(3)))
    np.testing.assert_allclose(tr, fd, rtol=0, atol=1e-6)
    np.testing.assert_allclose(s, sf(x, np.full(5, t)), rtol=1e-12, atol=0)


def test_bits_per_dim_of_the_uniform_density_is_8():
    # Dequantised pixels uniform on [-1, 1)^D have logp = -D ln 2: exactly 8 bits per pixel,
    # the cost of coding a uniform byte. And dequantize covers [p/128 - 1, (p+1)/128 - 1).
    D = 784
    assert L.bits_per_dim(-D * math.log(2), D) == pytest.approx(8.0, abs=1e-12)
    # on [0, 1) the same uniform has density 1: logp = 0, and the offset alone is 8 bits
    assert L.bits_per_dim(0.0, D, data_range=(0.0, 1.0)) == pytest.approx(8.0, abs=1e-12)
    p = np.arange(256).repeat(50)
    y = L.dequantize(p, np.random.default_rng(0))
    assert np.all(y >= p / 128 - 1) and np.all(y < (p + 1) / 128 - 1)


@pytest.mark.parametrize("kw,msg", [(dict(rtol=0), "rtol"), (dict(atol=-1), "atol"),
                                    (dict(divergence="trace"), "divergence"), (dict(probes=0), "probes"),
                                    (dict(probe="sphere"), "probe"), (dict(t_min=0.0), "t_min")])
def test_bad_arguments(kw, msg):
    gmm, sde = GaussianMixture.default(), VP()
    with pytest.raises(ValueError, match=msg):
        L.log_likelihood(sde, L.mixture_score(gmm, sde), np.zeros((2, 2)), np.random.default_rng(0), **kw)


def test_hutchinson_needs_a_generator():
    gmm, sde = GaussianMixture.default(), VP()
    with pytest.raises(TypeError, match="rng"):
        L.log_likelihood(sde, L.mixture_score(gmm, sde), np.zeros((2, 2)), None)


def test_score_without_jvp_is_refused():
    gmm, sde = GaussianMixture.default(), VP()
    with pytest.raises(ValueError, match="jvp"):
        L.log_likelihood(sde, lambda x, t: gmm.score(x, t, sde), np.zeros((2, 2)), np.random.default_rng(0))
    with pytest.raises(ValueError, match="0..255"):
        L.dequantize(np.array([256]), np.random.default_rng(0))


def test_image_bits_per_dim_pipeline():
    # 4-"pixel" images through a small float64 model: finite bits/dim, one NFE per batch, and a
    # cosine chain (no VP SDE limit) refused with a clear error.
    model = ScoreMLP(dim=4, widths=(8,), dtype=np.float64, seed=3)
    pixels = np.random.default_rng(0).integers(0, 256, size=(5, 4))
    res = L.image_bits_per_dim(model, {}, pixels, np.random.default_rng(1), batch=2, rtol=1e-3, atol=1e-3)
    assert res["bpd"].shape == (5,) and np.all(np.isfinite(res["bpd"])) and len(res["nfe"]) == 3
    with pytest.raises(ValueError, match="continuous-time model"):
        L.image_bits_per_dim(model, {"ddpm_schedule": {"kind": "cosine"}}, pixels, np.random.default_rng(1))
    with pytest.raises(ValueError, match="pixels"):
        L.image_bits_per_dim(model, {}, pixels[:, :3], np.random.default_rng(1))


def test_likelihood_to_dir(tmp_path):
    # A real checkpoint through the whole run: metrics.json with a finite mean and standard error
    # over 3 held-out images, one NFE per batch; a cosine chain refused.
    import json
    from tests.tiny_eps_checkpoint import make
    path, cosine = make(tmp_path)
    cfg = L.LikelihoodConfig(checkpoint=path, n=3, batch=2, rtol=1e-3, atol=1e-3)
    m = L.likelihood_to_dir(cfg, str(tmp_path / "lik"))
    saved = json.load(open(tmp_path / "lik" / "metrics.json"))
    assert saved["bits_per_dim_mean"] == m["bits_per_dim_mean"] and np.isfinite(m["bits_per_dim_mean"])
    assert m["bits_per_dim_se"] > 0 and len(m["nfe_per_batch"]) == 2 and saved["config"]["n"] == 3
    with pytest.raises(ValueError, match="continuous-time model"):
        L.likelihood_to_dir(L.LikelihoodConfig(checkpoint=cosine, n=2), str(tmp_path / "cos"))
    with pytest.raises(ValueError, match="more than"):
        L.likelihood_to_dir(L.LikelihoodConfig(checkpoint=path, n=10 ** 6), str(tmp_path / "big"))


def test_likelihood_command(tmp_path):
    # `refdiff likelihood` end to end on a tiny checkpoint, and its bad input: rtol <= 0 (argparse,
    # exit 2) and a cosine chain (no VP SDE: exit 2), each one line on stderr.
    import contextlib
    import io
    import json
    from refdiff.cli import main
    from tests.tiny_eps_checkpoint import make
    path, cosine = make(tmp_path)

    def cli(*argv):
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                code = main(list(argv))
            except SystemExit as exc:          # argparse
                code = exc.code
        return code, err.getvalue()

    code, err = cli("likelihood", "--checkpoint", path, "--n", "2", "--batch", "2", "--rtol", "1e-3",
                    "--atol", "1e-3", "--out", str(tmp_path / "lik"))
    assert code == 0, err
    assert np.isfinite(json.load(open(tmp_path / "lik" / "metrics.json"))["bits_per_dim_mean"])
    code, err = cli("likelihood", "--checkpoint", path, "--rtol", "0", "--out", str(tmp_path / "x"))
    assert code == 2 and "--rtol" in err
    code, err = cli("likelihood", "--checkpoint", cosine, "--n", "2", "--out", str(tmp_path / "cos"))
    assert code == 2 and "continuous-time model" in err and err.strip().count("\n") == 0, err
