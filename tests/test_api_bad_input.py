"""Bad input to the Python API of the numerical core: one row per class of mistake.

Each row is (name, call, expected exception type, regex the message must match). The
regex names the parameter (or, for a non-finite score or model output during sampling,
the step and the time), so a row fails both when nothing is raised (a silent result) and
when the wrong error escapes (an AttributeError from deep inside, a ZeroDivisionError...).

Run as a script to count the rows by outcome (clean / unclear / uncaught / silent):

    python tests/test_api_bad_input.py

clean: the expected type with the parameter named; unclear: a ValueError/TypeError whose
message does not name it; uncaught: any other exception; silent: no exception at all.
"""
from __future__ import annotations

import re
import sys

import numpy as np
import pytest

from refdiff import ddpm, losses, metrics, samplers
from refdiff.backend import REFERENCE
from refdiff.data import toy
from refdiff.nn import make_model
from refdiff.sde import OU, VE, VP, DDPMSchedule, make_sde

SHAPE = (4, 2)
SCHED = DDPMSchedule(10)
STRINGS = np.array([["a", "b"], ["c", "d"]])
OBJECTS = np.array([[1.0, None], [2.0, 3.0]], dtype=object)


def rng():
    return np.random.default_rng(0)


def zero_score(x, t):
    return np.zeros_like(x)


def nan_score(x, t):
    return np.full_like(x, np.nan)


def mlp():
    return make_model("mlp", dim=2, widths=(8,), dtype=np.float64)


class NanModel:
    """An eps-model whose output is NaN (as a diverged network's)."""

    kind, name, dtype, ops, input_shape, config = "eps", "nan", np.dtype(np.float64), REFERENCE, (2,), {}

    def forward(self, x, t):
        return np.full(x.shape, np.nan)


X0 = np.zeros((4, 2))
STEP_T = r"step \d+.*t ?= ?[0-9.e+-]+"        # a sampling failure names the step and the time
VT = (ValueError, TypeError)

CASES = [
    # -- rng must be a numpy Generator (every random draw takes one) ------------------------------
    ("em rng=None", lambda: samplers.euler_maruyama(VP(), zero_score, SHAPE, 5, None), TypeError, "rng"),
    ("pc rng=None", lambda: samplers.predictor_corrector(VP(), zero_score, SHAPE, 5, None), TypeError, "rng"),
    ("ode rng=None", lambda: samplers.probability_flow_heun(VP(), zero_score, SHAPE, 5, None), TypeError, "rng"),
    ("forward_simulate rng=None", lambda: samplers.forward_simulate(VP(), X0, 5, None), TypeError, "rng"),
    ("prior_sample rng=None", lambda: VP().prior_sample(SHAPE, None), TypeError, "rng"),
    ("dsm rng=None", lambda: losses.dsm(mlp(), VP(), X0, None), TypeError, "rng"),
    ("ssm rng=None", lambda: losses.ssm(mlp(), VP(), X0, None), TypeError, "rng"),
    ("ddpm_loss rng=None", lambda: ddpm.ddpm_loss(mlp(), SCHED, X0, None), TypeError, "rng"),
    ("ancestral rng=None", lambda: ddpm.ancestral(mlp(), SCHED, SHAPE, None), TypeError, "rng"),
    ("ddim rng=None", lambda: ddpm.ddim(mlp(), SCHED, SHAPE, None, steps=2), TypeError, "rng"),
    ("em_vp rng=None", lambda: ddpm.em_vp(mlp(), SHAPE, None, steps=2), TypeError, "rng"),
    ("ring rng=None", lambda: toy.ring(5, None), TypeError, "rng"),
    ("moons rng=None", lambda: toy.moons(5, None), TypeError, "rng"),
    ("gmm rng=None", lambda: toy.GaussianMixture.default().sample(5, None), TypeError, "rng"),
    ("sliced_wasserstein rng=5", lambda: metrics.sliced_wasserstein(X0, X0, rng=5), TypeError, "rng"),
    ("sample_projections rng=None", lambda: losses.sample_projections((3, 2), None), TypeError, "rng"),
    ("energy_distance rng='a'", lambda: metrics.energy_distance(X0, X0, rng="a"), TypeError, "rng"),
    # -- arrays of strings or objects ---------------------------------------------------------------
    ("frechet strings", lambda: metrics.frechet_distance(STRINGS, X0), TypeError, r"\ba\b.*(dtype|numbers)"),
    ("energy objects", lambda: metrics.energy_distance(X0, OBJECTS), TypeError, r"\bb\b.*(dtype|numbers)"),
    ("dsm strings", lambda: losses.dsm(mlp(), VP(), STRINGS, rng()), TypeError, r"x0.*(dtype|numbers)"),
    ("ddpm_loss objects", lambda: ddpm.ddpm_loss(mlp(), SCHED, OBJECTS, rng()), TypeError, r"x0.*(dtype|numbers)"),
    ("forward_simulate strings", lambda: samplers.forward_simulate(VP(), STRINGS, 5, rng()), TypeError,
     r"x0.*(dtype|numbers)"),
    ("marginal t string", lambda: VP().marginal(X0, "abc"), TypeError, r"\bt\b.*(dtype|numbers)"),
    ("schedule beta_start string", lambda: DDPMSchedule(beta_start="1e-4"), TypeError, "beta_start"),
    ("gmm score x strings", lambda: toy.GaussianMixture.default().score(STRINGS, 0.5, VP()), TypeError,
     r"\bx\b.*(dtype|numbers)"),
    ("gmm means strings", lambda: toy.GaussianMixture([1.0], [["a", "b"]], [np.eye(2)]), TypeError,
     r"means.*(dtype|numbers)"),
    # -- integers: bool is not an int, a float is not silently truncated ------------------------------
    ("em steps=True", lambda: samplers.euler_maruyama(VP(), zero_score, SHAPE, True, rng()), TypeError, "steps"),
    ("ddim steps=True", lambda: ddpm.ddim(mlp(), SCHED, SHAPE, rng(), steps=True), TypeError, "steps"),
    ("em_vp steps=True", lambda: ddpm.em_vp(mlp(), SHAPE, rng(), steps=True), TypeError, "steps"),
    ("ancestral batch=True", lambda: ddpm.ancestral(mlp(), SCHED, SHAPE, rng(), batch=True), TypeError, "batch"),
    ("schedule num_steps=True", lambda: DDPMSchedule(num_steps=True), TypeError, "num_steps"),
    ("ring n=True", lambda: toy.ring(True, rng()), TypeError, r"\bn\b"),
    ("sliced n_projections=True", lambda: metrics.sliced_wasserstein(X0, X0, n_projections=True), TypeError,
     "n_projections"),
    ("sample_from_checkpoint n=2.5", lambda: ddpm.sample_from_checkpoint(mlp(), {}, 2.5, rng(), sampler="ddim",
                                                                           steps=2), TypeError, r"\bn\b"),
    ("energy max_n=0", lambda: metrics.energy_distance(X0, X0, max_n=0), ValueError, "max_n"),
    ("energy max_n=2.5", lambda: metrics.energy_distance(X0, X0, max_n=2.5), TypeError, "max_n"),
    ("make_model dim=inf", lambda: make_model("mlp", dim=float("inf")), VT, r"\bdim\b"),
    ("make_model dim=2.5", lambda: make_model("mlp", dim=2.5), VT, r"\bdim\b"),
    ("make_model widths=(16.7,)", lambda: make_model("mlp", widths=(16.7,)), VT, "widths"),
    ("make_model time_scale=nan", lambda: make_model("mlp", time_scale=float("nan")), ValueError, "time_scale"),
    ("ddim eta=True", lambda: ddpm.ddim(mlp(), SCHED, SHAPE, rng(), steps=2, eta=True), TypeError, "eta"),
    ("ssm_fd fd_step=True", lambda: losses.ssm_fd(mlp(), VP(), X0, rng(), fd_step=True), TypeError, "fd_step"),
    # -- keyword arguments ----------------------------------------------------------------------------
    ("make_model bogus kwarg", lambda: make_model("mlp", depth=3), ValueError, r"depth.*dim, widths"),
    ("make_sde bogus kwarg", lambda: make_sde("vp", bogus=1), TypeError, r"bogus.*beta_min.*beta_max"),
    ("sliced p=nan", lambda: metrics.sliced_wasserstein(X0, X0, p=float("nan")), ValueError, r"\bp\b"),
    ("sliced p='2'", lambda: metrics.sliced_wasserstein(X0, X0, p="2"), TypeError, r"\bp\b"),
    # -- NaN/Inf times into a model -------------------------------------------------------------------
    ("mlp t=nan", lambda: mlp().forward(X0, np.array([0.5, np.nan, 0.5, 0.5])), ValueError, r"\bt\b.*NaN"),
    ("mlp t=inf", lambda: mlp().forward(X0, np.full(4, np.inf)), ValueError, r"\bt\b.*NaN or Inf"),
    # -- sampler settings ---------------------------------------------------------------------------------
    ("pc snr<0", lambda: samplers.predictor_corrector(VP(), zero_score, SHAPE, 3, rng(), snr=-0.1), ValueError,
     "snr"),
    ("pc snr=nan", lambda: samplers.predictor_corrector(VP(), zero_score, SHAPE, 3, rng(), snr=float("nan")),
     ValueError, "snr"),
    ("pc n_corrector<0", lambda: samplers.predictor_corrector(VP(), zero_score, SHAPE, 3, rng(), n_corrector=-1),
     ValueError, "n_corrector"),
    ("pc n_corrector=1.5", lambda: samplers.predictor_corrector(VP(), zero_score, SHAPE, 3, rng(),
                                                                n_corrector=1.5), TypeError, "n_corrector"),
    # -- a non-finite score or model output stops sampling, naming the step and the time ------------------
    ("em score_fn returns strings", lambda: samplers.euler_maruyama(VP(), lambda x, t: x.astype(str), SHAPE, 3,
                                                                    rng()), TypeError, r"score.*(dtype|numbers)"),
    ("em NaN score", lambda: samplers.euler_maruyama(VP(), nan_score, SHAPE, 3, rng()), FloatingPointError, STEP_T),
    ("pc NaN score", lambda: samplers.predictor_corrector(VP(), nan_score, SHAPE, 3, rng()), FloatingPointError,
     STEP_T),
    ("ode NaN score", lambda: samplers.probability_flow_heun(VP(), nan_score, SHAPE, 3, rng()), FloatingPointError,
     STEP_T),
    ("ancestral NaN model", lambda: ddpm.ancestral(NanModel(), SCHED, SHAPE, rng()), FloatingPointError, STEP_T),
    ("ddim NaN model", lambda: ddpm.ddim(NanModel(), SCHED, SHAPE, rng(), steps=2), FloatingPointError, STEP_T),
    ("em_vp NaN model", lambda: ddpm.em_vp(NanModel(), SHAPE, rng(), steps=2), FloatingPointError, STEP_T),
    # -- metrics: overflow is computed around (scale-free) or refused, never a NaN -------------------------
    ("energy 1e200", lambda: _finite_or_raise(metrics.energy_distance(X0 + 1e200 * np.eye(4, 2), X0)),
     ValueError, "overflow"),
    ("sliced 1e308", lambda: _finite_or_raise(metrics.sliced_wasserstein(1e308 * np.eye(4, 2), -X0 - 1e308)),
     ValueError, "overflow"),
    ("frechet 1e200", lambda: _finite_or_raise(metrics.frechet_distance(1e200 * np.eye(4, 2), X0)),
     ValueError, r"overflow"),
    # -- toy data -------------------------------------------------------------------------------------------
    ("gmm NaN means", lambda: toy.GaussianMixture([1.0], [[np.nan, 0.0]], [np.eye(2)]), ValueError, "means"),
    ("ring noise<0", lambda: toy.ring(5, rng(), noise=-0.1), ValueError, "noise"),
    ("ring radius=nan", lambda: toy.ring(5, rng(), radius=float("nan")), ValueError, "radius"),
    ("moons noise=nan", lambda: toy.moons(5, rng(), noise=float("nan")), ValueError, "noise"),
    ("swiss_roll noise=inf", lambda: toy.swiss_roll(5, rng(), noise=float("inf")), ValueError, "noise"),
    # -- SDE parameters whose coefficients overflow float64 ----------------------------------------------------
    ("OU beta=1e308", lambda: OU(1e308), ValueError, "beta"),
    ("OU sigma=1e200", lambda: OU(1.0, sigma=1e200), ValueError, "sigma"),
    ("VE sigma ratio=1e600", lambda: VE(sigma_min=1e-300, sigma_max=1e300), ValueError, "sigma_m(in|ax)"),
    ("VE sigma_max=1e200", lambda: VE(sigma_max=1e200), ValueError, "sigma_max"),
]

def _finite_or_raise(value):
    """The metrics rows may return: a finite value is the right answer for data near the
    float64 limit (the distances are computed in rescaled units); NaN or Inf is not."""
    if not np.isfinite(value):
        return value                      # silent non-finite result: the row fails
    raise _Finite(value)


class _Finite(Exception):
    """A metric returned a finite value for huge (but representable) data: correct."""


def classify(call, exc_type, pattern):
    """-> 'clean' | 'unclear' | 'uncaught' | 'silent', and the message."""
    try:
        out = call()
    except _Finite:
        return "clean", "finite value"
    except exc_type as exc:
        return ("clean" if re.search(pattern, str(exc)) else "unclear"), f"{type(exc).__name__}: {exc}"
    except (ValueError, TypeError) as exc:
        return "unclear", f"{type(exc).__name__}: {exc}"
    except Exception as exc:               # noqa: BLE001 - counting what escapes is the point
        return "uncaught", f"{type(exc).__name__}: {exc}"
    return "silent", f"returned {type(out).__name__}"


@pytest.mark.parametrize("name, call, exc_type, pattern", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gives_a_clear_error(name, call, exc_type, pattern):
    outcome, message = classify(call, exc_type, pattern)
    assert outcome == "clean", f"{name}: {outcome} ({message[:300]})"


def test_huge_but_representable_data_gives_the_right_distance():
    """Energy and sliced distances are homogeneous of degree 1: at scale 1e200 they must be
    1e200 times their value at scale 1 (to float64 rounding, rtol 1e-12: a few roundings
    of the rescaling), not NaN or Inf."""
    a, b = np.random.default_rng(1).standard_normal((2, 30, 3))
    for f in (metrics.energy_distance, lambda p, q: metrics.sliced_wasserstein(p, q, 16, np.random.default_rng(0))):
        small, big = f(a, b), f(1e200 * a, 1e200 * b)
        assert np.isfinite(big) and abs(big / 1e200 - small) <= 1e-12 * small


if __name__ == "__main__":
    counts = {}
    for name, call, exc_type, pattern in CASES:
        outcome, message = classify(call, exc_type, pattern)
        counts[outcome] = counts.get(outcome, 0) + 1
        if outcome != "clean" or "-v" in sys.argv:
            print(f"{outcome:9s} {name:28s} {message[:110]}")
    print(f"{len(CASES)} cases: " + ", ".join(f"{k} {counts.get(k, 0)}" for k in ("clean", "unclear", "uncaught",
                                                                                  "silent")))
