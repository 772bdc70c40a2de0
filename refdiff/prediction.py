"""Prediction targets (eps, x0, v), classifier-free guidance, and the one adapter that shows
every diffusion network to the samplers as a noise predictor (reference).

A diffusion network sees x_t = a x0 + s eps with a = sqrt(abar), s = sqrt(1 - abar)
(a^2 + s^2 = 1; Ho et al. 2020 eq. 4) and predicts one of three targets:

    eps   the noise                                      (Ho et al. 2020, eq. 14)
    x0    the clean image                                (Ho et al. 2020 §3.2; Karras' D)
    v     a eps - s x0, the "velocity"                    (Salimans & Ho 2022, §4 / appendix D)

Given x_t and abar, each determines the others (and the score of p(x_t)) exactly:

    x0    = (x - s eps) / a              eps  = (x - a x0) / s
    v     = a eps - s x0 = (eps - s x) / a = (a x - x0) / s
    x0    = a x - s v                    eps  = s x + a v
    score = -eps / s                     (Tweedie / DSM: grad log p(x_t) = -E[eps | x_t] / s)

(from v = a eps - s x0 and x = a x0 + s eps: a v + s x = (a^2 + s^2) eps = eps and
a x - s v = (a^2 + s^2) x0 = x0). Each map is affine in the prediction with coefficients that
depend on (x, abar) only, so an affine combination with weights summing to 1 (classifier-free
guidance below) commutes with every conversion: guiding in v, x0 or eps space is one thing.
The trained target is optimal in the same sense for every choice: the minimiser of E|p - p*|^2
is E[p* | x_t], and the conversions map E[x0 | x_t] to E[eps | x_t] and E[v | x_t].

abar of a model time t. Step i of the chain (refdiff.ddpm) is fed as t = (i + 1) / N; the
network was trained at those times only. `abar_at(schedule, t)` is

    u = t N - 1 in [-1, N - 1];   abar(t) = abar_u when u is a step (within float32 rounding
    of t: |u - round(u)| <= 2^-22 (u + 1)), else exp of the linear interpolation of
    log abar_i between the steps floor(u) and ceil(u), with abar_{-1} = 1 (the clean data).

On the grid that is the chain's abar_i exactly, so the discrete samplers (ddpm, ddim, dpm2m)
are exact. Between grid points it is the marginal of the chain's own continuous extension:
log abar(t) = -int_0^t beta~(r) dr with beta~ piecewise constant, beta~ = -N log(1 - beta_i)
on step i, = N (beta_i + beta_i^2 / 2 + ...). For the report's linear chain that is close to
the VP SDE's linear beta(t) that refdiff.ddpm.vp_for_schedule gives the continuous samplers:
over t in [1e-5, 1] the two marginals' std differ by at most 4.6 % (at t <= 1e-3) and their
mean coefficient sqrt(abar) by at most 3.3 % (at t = 1, where both are ~0.006; measured by
tests/test_prediction.py::test_chain_extension_against_the_vp_sde). An x0- or v-network is
thereby turned into the eps-network that the same training gives (an eps-model's output
means eps at its own time), and the continuous samplers (em, edm, rk45, heun-sde, likelihood,
inpainting) treat it exactly as they treat a trained eps-network: score = -eps / std_t of
their VP SDE (the gap between the two marginals is the same as for an eps-network trained
on the chain).

Classifier-free guidance (Ho & Salimans 2022, eq. 6 with w + 1 = W):

    eps_W = eps_uncond + W (eps_cond - eps_uncond) = (1 - W) eps_uncond + W eps_cond

eps_uncond is the network with the null label K, eps_cond with the asked label y. W = 0 is the
unconditional model and W = 1 the conditional one, exactly (the network is then called once,
with the null label or with y: (1 - W) p_u + W p_c with one weight 0 adds an exact 0).

`EpsModel(net, pred, schedule, labels, guidance)` does both: `forward(x, t)` returns the eps
the samplers expect (float64), `forward_jvp(x, t, v)` (when the network has one and no labels
are given) the eps and its Jacobian-vector product (the conversions are affine in x and the
prediction: d eps = s v_x + a d v, or (v_x - a d x0) / s). `as_eps(net, meta, ...)` is what
refdiff.generate.load_generator applies to every diffusion checkpoint: an eps-network without
labels is returned as it is (so every eps run is unchanged, bit for bit).

Shapes: x, v (B, ...), t (B,), labels (B,) int, abar (B,) broadcast over the rest.
Must agree with: the conversions round-trip to float64 rounding (tests/test_prediction.py,
hypothesis); for each target, the oracle of a one-image data set makes every sampler return
that image, and guidance 0 / 1 equal the unconditional / conditional network exactly
(tests/test_guidance.py).
"""
from __future__ import annotations

import math

import numpy as np

from .nn.base import predictor

PREDICTIONS = ("eps", "x0", "v")
GUIDANCE_NEEDS_CLASS = "--guidance needs --class: guidance mixes the model for a class with the unconditional one"


def check_prediction(pred, what="pred"):
    """pred must be one of PREDICTIONS; ValueError naming `what` otherwise."""
    if not isinstance(pred, str) or pred not in PREDICTIONS:
        raise ValueError(f"{what} (the prediction target) must be one of {', '.join(PREDICTIONS)}; got {pred!r}")
    return pred


def _coeffs(abar, x):
    """(a, s) = (sqrt(abar), sqrt(1 - abar)) shaped to broadcast against x (B, ...)."""
    abar = np.asarray(abar, dtype=np.float64)
    if abar.ndim == 1:
        abar = abar.reshape((-1,) + (1,) * (x.ndim - 1))
    return np.sqrt(abar), np.sqrt(1.0 - abar)


# --- exact conversions (host or backend arrays; abar a scalar or (B,) host array) -------------------------
def x0_from_eps(x, eps, abar):
    a, s = _coeffs(abar, x)
    return (x - s * eps) / a


def eps_from_x0(x, x0, abar):
    a, s = _coeffs(abar, x)
    return (x - a * x0) / s


def v_from_eps_x0(eps, x0, abar):
    a, s = _coeffs(abar, eps)
    return a * eps - s * x0


def eps_from_v(x, v, abar):
    a, s = _coeffs(abar, x)
    return s * x + a * v


def x0_from_v(x, v, abar):
    a, s = _coeffs(abar, x)
    return a * x - s * v


def v_from_eps(x, eps, abar):
    a, s = _coeffs(abar, x)
    return (eps - s * x) / a


def v_from_x0(x, x0, abar):
    a, s = _coeffs(abar, x)
    return (a * x - x0) / s


def score_from_eps(x, eps, abar):
    return -eps / _coeffs(abar, x)[1]


def eps_from_score(x, score, abar):
    return -score * _coeffs(abar, x)[1]


def to_eps(pred, x, p, abar):
    """The eps that prediction p of target `pred` means at (x, abar)."""
    if pred == "eps":
        return p
    if pred == "x0":
        return eps_from_x0(x, p, abar)
    if pred == "v":
        return eps_from_v(x, p, abar)
    return check_prediction(pred)


def target_of(pred, x0, eps, abar):
    """What a network of target `pred` is trained to output for x_t = a x0 + s eps."""
    if pred == "eps":
        return eps
    if pred == "x0":
        return x0
    if pred == "v":
        return v_from_eps_x0(eps, x0, abar)
    return check_prediction(pred)


# --- abar of a model time ---------------------------------------------------------------------------------
SNAP = 2.0 ** -22           # relative: 4 x float32's rounding error (2^-24) of a grid time t = (i + 1) / N


def abar_at(schedule, t):
    """abar for model times t (B,) or a scalar (see the module docstring) -> float64, t's shape."""
    t = np.asarray(t, dtype=np.float64)
    N = schedule.num_steps
    if np.any(~np.isfinite(t)) or np.any(t < 0) or np.any(t > 1 + SNAP):
        raise ValueError(f"model times must lie in [0, 1]; got values in [{np.min(t)}, {np.max(t)}]")
    log_ab = np.concatenate([[0.0], np.log(schedule.alpha_bars)])       # knots u = -1 .. N-1
    u = np.clip(t * N - 1.0, -1.0, N - 1.0)
    k = np.rint(u)
    on_grid = np.abs(u - k) <= SNAP * (k + 1.0)
    lo = np.minimum(np.floor(u), N - 2).astype(np.int64) if N > 1 else np.full(u.shape, -1, dtype=np.int64)
    frac = u - lo
    interp = np.exp((1.0 - frac) * log_ab[lo + 1] + frac * log_ab[np.minimum(lo + 2, N)])
    exact = np.concatenate([[1.0], schedule.alpha_bars])[k.astype(np.int64) + 1]
    return np.where(on_grid, exact, interp)


# --- the adapter ------------------------------------------------------------------------------------------
def num_classes(net):
    """K of a class-conditional network (config["num_classes"]), 0 for an unconditional one."""
    return int((getattr(net, "config", None) or {}).get("num_classes") or 0)


def check_labels(net, labels, what="--class"):
    """labels (B,) ints in [0, K-1] for the network's K classes -> int64 array; ValueError
    naming `what` (the flag or argument the labels came from)."""
    K = num_classes(net)
    if K == 0:
        raise ValueError(f"{what} needs a class-conditional model; {getattr(net, 'name', 'this model')!r} is "
                         f"unconditional (num_classes 0)")
    y = np.asarray(labels)
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{what} must be a 1-D array of integer labels; got {y.dtype} {y.shape}")
    if y.size and (y.min() < 0 or y.max() > K - 1):
        bad = int(y.min() if y.min() < 0 else y.max())
        raise ValueError(f"{what} {bad} is outside the trained classes [0, {K - 1}] (num_classes {K})")
    return y.astype(np.int64)


class EpsModel:
    """A diffusion network of any target (and, with `labels`, guided at scale `guidance`)
    seen as an eps-model: forward(x, t) -> eps (float64, x's shape). See the module docstring."""

    kind = "eps"

    def __init__(self, net, pred="eps", schedule=None, labels=None, guidance=None, null_label_trained=True):
        self.net, self.pred = net, check_prediction(pred)
        self.null_label_trained = bool(null_label_trained)
        if pred != "eps" and schedule is None:
            raise ValueError(f"an {pred}-prediction model needs its DDPM schedule to be seen as eps")
        self.schedule = schedule
        self.labels = None if labels is None else check_labels(net, labels)
        if guidance is not None and self.labels is None:
            raise ValueError(GUIDANCE_NEEDS_CLASS)
        w = 1.0 if guidance is None else guidance
        if isinstance(w, bool) or not isinstance(w, (int, float, np.integer, np.floating)) \
                or not math.isfinite(w) or w < 0:
            raise ValueError(f"guidance must be a finite number >= 0 (0: unconditional, 1: conditional); got {w!r}")
        self.guidance = float(w)
        self.name, self.dtype, self.ops = net.name, net.dtype, net.ops
        self.config = net.config
        if getattr(net, "input_shape", None) is not None:
            self.input_shape = net.input_shape
        if self.labels is None and callable(getattr(net, "forward_jvp", None)):
            self.forward_jvp = self._forward_jvp

    def _net(self, x, t, y):
        f = predictor(self.net)               # the network's inference forward
        return f(x, t) if y is None else f(x, t, y=y)

    def _check_null_label(self):
        """The null label is about to be used: refuse it where the run never trained it."""
        if not self.null_label_trained:
            raise ValueError(NULL_LABEL_UNTRAINED)

    def raw(self, x, t):
        """The network's own prediction (guided when labels are given), float64."""
        f64 = lambda a: a.astype(np.float64)                                    # noqa: E731
        if self.labels is None or self.guidance != 1.0:
            self._check_null_label()
        if self.labels is None:
            return f64(self._net(x, t, None))
        if self.labels.shape[0] != x.shape[0]:
            raise ValueError(f"guided model: {x.shape[0]} images but {self.labels.shape[0]} labels")
        w = self.guidance
        if w == 1.0:
            return f64(self._net(x, t, self.labels))
        null = np.full(x.shape[0], num_classes(self.net), dtype=np.int64)
        if w == 0.0:
            return f64(self._net(x, t, null))
        return (1.0 - w) * f64(self._net(x, t, null)) + w * f64(self._net(x, t, self.labels))

    def _coeffs(self, t, x):
        """(a, s) on the model's backend, float64, shaped to broadcast against x (B, ...)."""
        a, s = _coeffs(abar_at(self.schedule, self.ops.to_numpy(t)), x)
        return self.ops.asarray(a), self.ops.asarray(s)

    def forward(self, x, t):
        p = self.raw(x, t)
        if self.pred == "eps":
            return p
        a, s = self._coeffs(t, x)
        x64 = x.astype(np.float64)
        return (x64 - a * p) / s if self.pred == "x0" else s * x64 + a * p

    def _forward_jvp(self, x, t, v):
        self._check_null_label()
        return self._eps_product(x, t, v, *self.net.forward_jvp(x, t, v))

    def _vjp(self, x, t, v):
        """(eps, (d eps/dx)^T v) by one forward and one backward pass of the network (the null
        label for a conditional one); the parameter gradients that backward accumulates are
        zeroed afterwards."""
        self._check_null_label()
        p = self.net.forward(x, t)
        dp = self.net.backward(v)                                              # (dp/dx)^T v
        self.net.zero_grad()
        return self._eps_product(x, t, v, p, dp)

    def _eps_product(self, x, t, v, p, dp):
        """eps and its derivative product from the network's p and dp, dp being (dp/dx) v or
        (dp/dx)^T v: the conversion is per sample x times a scalar plus p times a scalar, so
        the same formula carries v to either product."""
        p, dp = p.astype(np.float64), dp.astype(np.float64)
        if self.pred == "eps":
            return p, dp
        a, s = self._coeffs(t, x)
        x64, v64 = x.astype(np.float64), v.astype(np.float64)
        if self.pred == "x0":                                                  # eps = (x - a p) / s
            return (x64 - a * p) / s, (v64 - a * dp) / s
        return s * x64 + a * p, s * v64 + a * dp                               # v: eps = s x + a p

    def __repr__(self):
        w = self.guidance if self.labels is not None else None
        return f"EpsModel({self.name!r}, pred={self.pred!r}, guidance={w})"


def prediction_of(meta):
    """The prediction target a checkpoint records (meta["prediction"]; absent: "eps")."""
    pred = (meta or {}).get("prediction", "eps")
    return check_prediction(pred, "the checkpoint's prediction target")


NULL_LABEL_UNTRAINED = ("this class-conditional checkpoint was trained with --label-dropout 0, so its null label "
                        "(the unconditional model) never was: sample with --class K and --guidance 1 (the default), "
                        "or train with --label-dropout > 0 (0.1 as Ho & Salimans 2022)")


def null_label_trained(net, meta):
    """False for a class-conditional network whose training run recorded label dropout 0: the
    null label K never occurred in its batches, so its embedding is still the random init
    (its unconditional prediction, guidance W != 1, the likelihood, inpainting would be noise)."""
    if not num_classes(net):
        return True
    cfg = (meta or {}).get("train_config") or {}
    return not ("label_dropout" in cfg and not cfg["label_dropout"])


def as_eps(net, meta, labels=None, guidance=None):
    """The network of a diffusion checkpoint as the samplers see it: `net` itself for an eps
    target without labels (bit for bit what it always was), else an EpsModel (also for a
    conditional network whose null label was never trained: it refuses to use it)."""
    from .ddpm import schedule_from_meta

    if isinstance(net, EpsModel):
        net = net.net
    pred = prediction_of(meta)
    trained = null_label_trained(net, meta)
    if pred == "eps" and labels is None and trained:
        if guidance is not None:
            EpsModel(net, pred, labels=labels, guidance=guidance)        # raises the error guidance alone gets
        return net
    return EpsModel(net, pred, schedule_from_meta(meta), labels=labels, guidance=guidance,
                    null_label_trained=trained)


def class_labels(classes, n):
    """n labels (n,) int64 for the asked classes c_1..c_m, in m contiguous blocks: image j
    gets c_{floor(j m / n)}, so the blocks' sizes differ by at most one (the longer first).
    --class 0,1,...,9 --n 100 gives 10 images of each digit in order: row k of the 10-wide
    grid (refdiff.figures.save_grid) is digit k."""
    classes = [int(c) for c in classes]
    if not classes:
        raise ValueError("--class needs at least one class")
    if n < len(classes):
        raise ValueError(f"--n {n} is fewer than the {len(classes)} classes asked (--class): each needs one image")
    j = np.arange(n)
    return np.asarray(classes, dtype=np.int64)[(j * len(classes)) // n]


__all__ = ["PREDICTIONS", "check_prediction", "x0_from_eps", "eps_from_x0", "v_from_eps_x0", "eps_from_v",
           "x0_from_v", "v_from_eps", "v_from_x0", "score_from_eps", "eps_from_score", "to_eps", "target_of",
           "abar_at", "num_classes", "check_labels", "EpsModel", "prediction_of", "as_eps", "class_labels",
           "null_label_trained", "NULL_LABEL_UNTRAINED"]
