"""refdiff.inpaint's RePaint resampling (Lugmayr et al. 2022, Algorithm 1): U = 1 is the plain
replacement with the same draws, known entries stay exact, the re-noising (eq. 2) keeps the
SDE's marginals, resampling moves the filled entries towards the exact conditional of
Gaussian data where the plain replacement is biased, and bad U / J values are refused (API
and CLI)."""
import math

import numpy as np
import pytest

from refdiff import solvers
from refdiff.data.toy import GaussianMixture
from refdiff.inpaint import forward_transition, inpaint
from refdiff.sde import VE, VP, SubVP

A, B = np.array([1.0, 1.0, -1.0, 0.5]), np.array([-1.0, -1.0, 1.0, -0.5])


def two_images():
    gmm = GaussianMixture([0.5, 0.5], [A, B], np.tile(0.05 ** 2 * np.eye(4), (2, 1, 1)))
    sde = VP()
    return sde, (lambda x, t: gmm.score(x, t, sde))


def replacement_reference(sde, score_fn, y, m, steps, rng, t_min, spacing, one_step):
    """score_sde's replacement method written out on its own (Song et al. 2021 app. I.2): the
    draws, in order, are the prior, then per step the known entries' noise and the step's dW."""
    ts = solvers.time_grid(sde, steps, t_min, spacing)
    b, sigma = solvers._reverse_fields(sde, score_fn)
    x = sde.prior_sample(y.shape, rng)
    for k in range(steps):
        gamma, std = (float(c) for c in sde.marginal_coeffs(np.float64(ts[k])))
        x = m * (gamma * y + std * rng.standard_normal(y.shape)) + (1 - m) * x
        h = ts[k] - ts[k + 1]
        x = one_step(b, sigma, x, ts[k], ts[k + 1], math.sqrt(h) * rng.standard_normal(y.shape) if k < steps - 1
                     else 0.0)
    return m * y + (1 - m) * x


@pytest.mark.parametrize("step,jump", [("em", 1), ("heun", 4)])
def test_one_resample_is_the_plain_replacement(step, jump):
    sde, sf = two_images()
    y, m = np.tile(A, (6, 1)), np.array([1.0, 0, 1, 0])
    ref = replacement_reference(sde, sf, y, m, 30, np.random.default_rng(7), 1e-3, "squared",
                                solvers.em_step if step == "em" else solvers.stochastic_heun_step)
    out = inpaint(sde, sf, y, m, 30, np.random.default_rng(7), step=step, resample=1, jump=jump)
    np.testing.assert_array_equal(out, ref)


@pytest.mark.parametrize("sde", [VP(), SubVP(), VE(0.05, 3.0)], ids=["vp", "subvp", "ve"])
def test_renoising_keeps_the_marginals(sde):
    # Gaussian data N(mu, c): x_s ~ N(gamma_s mu, gamma_s^2 c + std_s^2); eq. (2) from s to t
    # must give N(gamma_t mu, gamma_t^2 c + std_t^2). 200,000 draws: the mean within 5 standard
    # errors, the variance within 5 of its standard errors (sqrt(2/n) var for a Gaussian).
    rng, n, mu, c, s, t = np.random.default_rng(0), 200_000, 0.7, 0.3, 0.2, 0.6
    gs, ss = (float(v) for v in sde.marginal_coeffs(np.float64(s)))
    gt, st = (float(v) for v in sde.marginal_coeffs(np.float64(t)))
    xs = gs * (mu + math.sqrt(c) * rng.standard_normal((n, 1))) + ss * rng.standard_normal((n, 1))
    xt = forward_transition(sde, xs, s, t, rng)
    var = gt ** 2 * c + st ** 2
    assert abs(xt.mean() - gt * mu) <= 5 * math.sqrt(var / n)
    assert abs(xt.var() - var) <= 5 * var * math.sqrt(2 / n)


def test_known_entries_exact_and_the_two_image_oracle():
    # With resampling the known pixels stay exact and each sample still ends at the image its
    # known pixels come from (within 0.3, 6 component stds, as tests/test_inpaint.py).
    sde, sf = two_images()
    y = np.where(np.arange(20)[:, None] < 10, A, B) * np.array([1, 1, 0, 0])
    out = inpaint(sde, sf, y, np.array([1, 1, 0, 0]), 60, np.random.default_rng(0), step="em", denoise=True,
                  resample=3, jump=5)
    assert np.array_equal(out[:, :2], y[:, :2])
    assert np.max(np.abs(out[:, 2:] - np.where(np.arange(20)[:, None] < 10, A, B)[:, 2:])) < 0.3


def test_all_known_mask_returns_the_input():
    sde, sf = two_images()
    y = np.random.default_rng(1).standard_normal((5, 4))
    out = inpaint(sde, sf, y, np.ones(4), 12, np.random.default_rng(2), resample=4, jump=3)
    assert np.array_equal(out, y)


def test_resampling_moves_towards_the_exact_conditional():
    # Gaussian data in 2-D with correlation rho = 0.98 (exact score: -S_t^{-1} (x - 0),
    # S_t = gamma^2 C + std^2 I); known x_1 = 2, so x_2 | x_1 ~ N(rho 2, 1 - rho^2). With
    # 20 EM steps the plain replacement's mean of x_2 falls short of rho 2 = 1.96 (its
    # unknown entry follows known entries drawn independently of it); RePaint with U = 10
    # must get closer, by more than 10 standard errors of the two means (n = 4,000 each).
    rho = 0.98
    C = np.array([[1.0, rho], [rho, 1.0]])
    sde = VP()

    def score(x, t):
        g, s = (float(v) for v in sde.marginal_coeffs(np.float64(np.asarray(t).ravel()[0])))
        return -x @ np.linalg.inv(g * g * C + s * s * np.eye(2))

    n = 4000
    y, m = np.tile([2.0, 0.0], (n, 1)), np.array([1.0, 0.0])
    plain = inpaint(sde, score, y, m, 20, np.random.default_rng(0), step="em", denoise=True)[:, 1]
    repaint = inpaint(sde, score, y, m, 20, np.random.default_rng(0), step="em", denoise=True, resample=10)[:, 1]
    err_plain, err_repaint = abs(plain.mean() - 2 * rho), abs(repaint.mean() - 2 * rho)
    se = math.sqrt((plain.var() + repaint.var()) / n)
    assert err_plain - err_repaint > 10 * se, (err_plain, err_repaint, se)
    # and its spread is the conditional's, sqrt(1 - rho^2), within 5 standard errors of a
    # standard deviation estimated from n draws (sd / sqrt(2 n)); the plain one's is not
    sd = math.sqrt(1 - rho ** 2)
    assert abs(repaint.std() - sd) <= 5 * sd / math.sqrt(2 * n) < abs(plain.std() - sd)


@pytest.mark.parametrize("kw,err,msg", [(dict(resample=0), ValueError, "resample"), (dict(jump=0), ValueError, "jump"),
                                        (dict(resample=1.5), TypeError, "resample"),
                                        (dict(jump=True), TypeError, "jump")])
def test_bad_resampling_values(kw, err, msg):
    sde, sf = two_images()
    with pytest.raises(err, match=msg):
        inpaint(sde, sf, np.zeros((2, 4)), np.ones(4), 5, np.random.default_rng(0), **kw)


def test_sample_command_resampling(tmp_path):
    # `refdiff sample --inpaint ... --resample U --jump J` end to end on a tiny checkpoint; bad
    # values: argparse's usage and one error line naming the flag, exit 2; --resample without
    # --inpaint: one line on stderr, exit 2.
    import contextlib
    import io

    from refdiff.cli import main
    from tests.tiny_eps_checkpoint import make
    path, _ = make(tmp_path)
    images = np.random.default_rng(0).uniform(-1, 1, (3, 1, 28, 28)).astype(np.float32)
    mask = np.ones((1, 28, 28))
    mask[:, 14:] = 0
    np.save(tmp_path / "x.npy", images)
    np.save(tmp_path / "m.npy", mask)

    def cli(*argv):
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                code = main(list(argv))
            except SystemExit as exc:
                code = exc.code
        return code, err.getvalue()

    base = ["sample", "--checkpoint", path, "--n", "2", "--steps", "6", "--sampler", "em"]
    code, err = cli(*base, "--inpaint", str(tmp_path / "m.npy"), "--from", str(tmp_path / "x.npy"),
                    "--resample", "3", "--jump", "2", "--out", str(tmp_path / "ok"))
    assert code == 0, err
    out = np.load(tmp_path / "ok" / "samples.npy")
    np.testing.assert_array_equal(out[:, :, :14], images[:2, :, :14])
    for bad in (["--resample", "0"], ["--jump", "-1"], ["--resample", "x"]):
        code, err = cli(*base, "--inpaint", str(tmp_path / "m.npy"), "--from", str(tmp_path / "x.npy"), *bad,
                        "--out", str(tmp_path / "bad"))
        assert code == 2 and bad[0] in err.strip().splitlines()[-1], err
    code, err = cli(*base, "--resample", "2", "--out", str(tmp_path / "nomask"))
    assert code == 2 and "--resample" in err and err.strip().count("\n") == 0, err


@pytest.mark.parametrize("resample, jump, bad, error", [(0, 1, "resample", ValueError), (1, 0, "jump", ValueError),
                                                        (2.5, 1, "resample", TypeError), (1, "3", "jump", TypeError)])
def test_check_resampling_names_the_bad_value(resample, jump, bad, error):
    # out of range: ValueError; not an integer: TypeError (refdiff.validate.check_int); each names the value
    from refdiff.inpaint import check_resampling
    with pytest.raises(error, match=bad):
        check_resampling(resample, jump)
    assert check_resampling(1, 1) is None and check_resampling(10, 10) is None
