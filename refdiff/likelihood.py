"""Exact log-likelihoods of a score model through the probability-flow ODE (reference).

The probability-flow ODE of a linear SDE (Song et al. 2021, eq. 13),

    dx/dt = f~(x, t) = f(x, t) - 1/2 g(t)^2 s(x, t),        f(x, t) = -a(t) x,

moves samples of p_{t_min} to samples of p_T. Along one trajectory the log-density obeys the
instantaneous change of variables (Chen et al. 2018, Neural ODEs, thm. 1; Song et al. 2021,
eq. 39 in appendix D.2),

    d/dt log p_t(x(t)) = -div f~(x(t), t),
    div f~ = -a(t) D - 1/2 g(t)^2 tr(ds/dx),

so, integrating the state x and delta = int_{t_min}^t div f~ together from t = t_min to T,

    log p_{t_min}(x) = log p_T(x(T)) + int_{t_min}^T div f~(x(t), t) dt
                     ~ prior_logp(x(T)) + delta(T).                                   (1)

`log_likelihood` integrates the joint ODE (1) for the whole batch as one system with
scipy.integrate.solve_ivp (RK45 by default; `rtol`, `atol` exposed) and returns the
log-density per sample and the number of drift evaluations (NFE, score_sde's `nfe`).

The trace tr(ds/dx) needs products of the score's Jacobian J = ds/dx with vectors, and
both kinds give it, since v^T J v = v^T (J^T v) and e_i^T J e_i = e_i^T J^T e_i:

    "jvp"   J v by forward mode: `score_fn.jvp(x, t, v) -> (s, J v)`
    "vjp"   J^T v by reverse mode: `score_fn.vjp(x, t, v) -> (s, J^T v)`, one forward and
            one backward pass of the network (score_sde's likelihood.py computes
            grad_x (f(x) . v) . v by autograd: the same vector-Jacobian product)

A score is "JVP-capable" or "VJP-capable" when it carries the attribute; `route="auto"`
(the default) takes the VJP where there is one: a model's backward is the fast path every
backend already runs for training. Two scores are provided:

    model_score(model, sde)     a noise-prediction model, s = -eps_theta / std_t,
                                J v = -(d eps_theta/dx) v / std_t by the model's forward
                                mode (`forward_jvp`: refdiff.nn.tangent, the MLP and UNets),
                                J^T v = -(d eps_theta/dx)^T v / std_t by its `backward`
                                (for an x0- or v-network seen as an eps-model by
                                refdiff.prediction.EpsModel, through the affine conversion:
                                eps = s x + a p gives (d eps/dx)^T v = s v + a (dp/dx)^T v,
                                eps = (x - a p) / s gives (v - a (dp/dx)^T v) / s)
    mixture_score(gmm, sde)     refdiff.data.toy.GaussianMixture's exact diffused score and
                                its exact Jacobian (derived at `_mixture_jvp`); J is the
                                Hessian of log p_t, symmetric, so its VJP is its JVP

Divergence estimators (x (B, ...), D = prod(x.shape[1:])):

    "exact"        tr J = sum_i e_i^T J e_i: one JVP per dimension, evaluated as one batched
                   call on B D rows (small D: toy data)
    "hutchinson"   tr J ~ 1/P sum_p v_p^T J v_p, E[v v^T] = I (Hutchinson 1989; Grathwohl
                   et al. 2019, FFJORD), P = `probes` probes, "rademacher" or "gaussian",
                   drawn once from `rng` and held fixed along the ODE (as score_sde's
                   likelihood.py: a fixed probe gives a continuous ODE). The logp it gives
                   is unbiased (eq. 1 is linear in the trace); exp(logp) is not.

Bits per dimension of 8-bit images (score_sde's run_lib.py `evaluate` + likelihood.py):
pixels p in {0..255} are dequantised y = lo + (hi - lo) (p + u) / 256, u ~ U[0, 1)^D
(`dequantize`), so y has a density on [lo, hi)^D, and

    bpd = -log p_y(y) / (D ln 2) + log2(256 / (hi - lo))                         (2)

(`bits_per_dim`): the last term is the change of variables from [0, 256)^D, where the
discrete model's bits are counted, to the model's range. refdiff's images live in
[-1, 1] (refdiff.data.images), so the offset is log2(128) = 7: score_sde's
`offset = 7 - inverse_scaler(-1)` for centred data (8 for data in [0, 1]).
(-log p_y is the continuous model's negative log-likelihood of the dequantised image: an
upper bound, in bits, on the discrete model's codelength, Theis et al. 2016.)

Must agree with: closed-form Gaussian log-densities under their exact score, a Gaussian
mixture's analytic density (GaussianMixture, to 0.01 nats/dim), a 1-D flow integrated by
quadrature (tests/test_likelihood.py).
The two routes give the same Hutchinson and exact traces to rounding (float64 to the float32
error rescaled to float64's unit roundoff; tests/test_likelihood_vjp.py).
"""
from __future__ import annotations

import dataclasses
import math
import os
import time
from dataclasses import dataclass

import numpy as np
from scipy.integrate import solve_ivp

from ._checks import check_array_float, check_int, check_real, check_rng
from .sde import bcast

DIVERGENCES = ("exact", "hutchinson")
PROBES = ("rademacher", "gaussian")
ROUTES = ("auto", "vjp", "jvp")


# --- JVP-capable scores ---------------------------------------------------------------------------
def model_score(model, sde):
    """A noise-prediction model as score_fn(x, t) = -eps_theta(x, t) / std_t (host float64
    arrays), with score_fn.jvp(x, t, v) -> (s, J v) through model.forward_jvp and
    score_fn.vjp(x, t, v) -> (s, J^T v) through its forward and backward passes, each where
    the model has them (at least one is required)."""
    F = model.ops
    net_vjp = _eps_vjp_of(model)
    if not callable(getattr(model, "forward_jvp", None)) and net_vjp is None:
        raise ValueError(f"model {getattr(model, 'name', type(model).__name__)!r} has neither forward_jvp nor "
                         f"backward: its score has no Jacobian product")

    def _std(x, t):
        t = np.broadcast_to(np.asarray(t, dtype=np.float64), (x.shape[0],))
        return t, bcast(sde.marginal_coeffs(t)[1], x)

    def _in(a):
        return F.asarray(np.asarray(a).astype(model.dtype))

    def _out(a):
        return np.asarray(F.to_numpy(a), dtype=np.float64)

    def score_fn(x, t):
        t, std = _std(x, t)
        return -_out(model.forward(_in(x), _in(t))) / std

    def jvp(x, t, v):
        t, std = _std(x, t)
        e, ed = model.forward_jvp(_in(x), _in(t), _in(v))
        return -_out(e) / std, -_out(ed) / std

    def vjp(x, t, v):
        t, std = _std(x, t)
        e, et_v = net_vjp(_in(x), _in(t), _in(v))
        return -_out(e) / std, -_out(et_v) / std

    if callable(getattr(model, "forward_jvp", None)):
        score_fn.jvp = jvp
    if net_vjp is not None:
        score_fn.vjp = vjp
    return score_fn


def _eps_vjp_of(model):
    """-> eps_vjp(x, t, v) = (eps, (d eps/dx)^T v) on the model's backend arrays, by one forward
    and one backward pass, or None when the model has no backward. The parameter gradients
    that backward accumulates are not this function's business: they are zeroed afterwards
    (zero_grad), so a likelihood leaves the model as it found it. An EpsModel (an x0- or
    v-network, or a conditional one through its null label) is differentiated through its
    affine conversion (EpsModel._vjp, which shares the conversion with its forward-mode
    twin _forward_jvp)."""
    from .prediction import EpsModel

    if not isinstance(model, EpsModel):
        if not callable(getattr(model, "backward", None)):
            return None

        def plain(x, t, v):
            e = model.forward(x, t)
            g = model.backward(v)
            model.zero_grad()
            return e.astype(np.float64), g.astype(np.float64)
        return plain
    if model.labels is not None or not callable(getattr(model.net, "backward", None)):
        return None
    return model._vjp


def _mixture_jvp(gmm, sde, x, t, v):
    """Exact score of a diffused GaussianMixture and its Jacobian times v.

    With S_k = gamma^2 C_k + std^2 I, w_k = S_k^{-1} (x - gamma m_k) and responsibilities r_k,
    s = -sum_k r_k w_k and d log r_k / dx = -w_k - s, hence

        J v = -sum_k r_k S_k^{-1} v + sum_k r_k (w_k . v) w_k - (s . v) s.

    x, v (N, D), t scalar or (N,) -> (s, J v), both (N, D).
    """
    gamma, std = sde.marginal_coeffs(np.broadcast_to(np.asarray(t, dtype=np.float64), (x.shape[0],)))
    lam = gamma[:, None, None] ** 2 * gmm.eigvals[None] + std[:, None, None] ** 2      # (N, K, D)
    U = gmm.eigvecs                                                                     # (K, D, D)
    diff = x[:, None, :] - gamma[:, None, None] * gmm.means[None]                       # (N, K, D)
    y = np.einsum("nkd,kde->nke", diff, U)   # U^T diff
    w = np.einsum("kde,nke->nkd", U, y / lam)
    logp = np.log(gmm.weights)[None] - 0.5 * np.sum(np.log(lam), -1) - 0.5 * np.sum(y * y / lam, -1)
    r = np.exp(logp - logp.max(axis=1, keepdims=True))
    r /= r.sum(axis=1, keepdims=True)                                                   # (N, K)
    s = -np.einsum("nk,nkd->nd", r, w)
    yv = np.einsum("nd,kde->nke", v, U)
    sinv_v = np.einsum("kde,nke->nkd", U, yv / lam)
    wv = np.einsum("nkd,nd->nk", w, v)
    jv = (-np.einsum("nk,nkd->nd", r, sinv_v) + np.einsum("nk,nkd->nd", r * wv, w)
          - np.sum(s * v, axis=1, keepdims=True) * s)
    return s, jv


def mixture_score(gmm, sde):
    """GaussianMixture's exact score as score_fn(x, t) (gmm.score), with score_fn.jvp(x, t, v)
    -> (s, J v) exact (`_mixture_jvp`), and the same function as score_fn.vjp (J symmetric)."""

    def score_fn(x, t):
        return gmm.score(x, t, sde)

    score_fn.jvp = lambda x, t, v: _mixture_jvp(gmm, sde, np.asarray(x, np.float64), t, np.asarray(v, np.float64))
    score_fn.vjp = score_fn.jvp                 # J = Hessian of log p_t: symmetric
    return score_fn


# --- divergence of the score ----------------------------------------------------------------------
def resolve_route(score_fn, route="auto"):
    """-> "vjp" or "jvp": the asked route, checked against what score_fn carries; "auto" is the
    VJP where score_fn has one, else the JVP. ValueError naming `route` (or what is missing)."""
    if route not in ROUTES:
        raise ValueError(f"route must be one of {ROUTES}; got {route!r}")
    has = {r: callable(getattr(score_fn, r, None)) for r in ("vjp", "jvp")}
    if route == "auto":
        route = "vjp" if has["vjp"] else "jvp"
    if not has[route]:
        raise ValueError(f"score_fn has no .{route}(x, t, v): the divergence needs Jacobian products; wrap a "
                         f"model with refdiff.likelihood.model_score(model, sde) or a GaussianMixture with "
                         f"mixture_score(gmm, sde)" + (f" (or use route='{'jvp' if route == 'vjp' else 'vjp'}')"
                                                       if any(has.values()) else ""))
    return route


def _products(score_fn, route, x, t, v):
    """(s, J v) or (s, J^T v): the two routes' products, whose v-weighted sums are equal."""
    return getattr(score_fn, resolve_route(score_fn, route))(x, t, v)


def divergence_exact(score_fn, x, t, route="auto"):
    """(s, tr ds/dx): e_i^T J e_i (or e_i^T J^T e_i) for each dimension, batched as B D rows. x (B, ...)."""
    B, D = x.shape[0], int(np.prod(x.shape[1:]))
    eye = np.eye(D).reshape((D, 1) + x.shape[1:])                       # e_i, (D, 1, ...)
    xs = np.broadcast_to(x[None], (D,) + x.shape).reshape((D * B,) + x.shape[1:])
    vs = np.broadcast_to(eye, (D,) + x.shape).reshape((D * B,) + x.shape[1:])
    ts = np.tile(np.broadcast_to(np.asarray(t, np.float64), (B,)), D)
    s, jv = _products(score_fn, route, xs, ts, vs)
    diag = np.sum((jv * vs).reshape(D, B, D), axis=2)                   # (D, B): (J e_i)_i
    return s[:B], diag.sum(axis=0)


def sample_probes(shape, rng, kind="rademacher"):
    """Hutchinson probes (P, B, ...) with E[v v^T] = I: +-1 entries or N(0, I)."""
    if kind == "rademacher":
        return 2.0 * rng.integers(0, 2, size=shape) - 1.0
    if kind == "gaussian":
        return rng.standard_normal(shape)
    raise ValueError(f"probe must be one of {PROBES}; got {kind!r}")


def divergence_hutchinson(score_fn, x, t, probes, route="auto"):
    """(s, 1/P sum_p v_p^T J v_p) for probes (P, B, ...), one batched JVP or VJP on P B rows."""
    P, B = probes.shape[0], x.shape[0]
    xs = np.broadcast_to(x[None], probes.shape).reshape((P * B,) + x.shape[1:])
    ts = np.tile(np.broadcast_to(np.asarray(t, np.float64), (B,)), P)
    s, jv = _products(score_fn, route, xs, ts, probes.reshape(xs.shape))
    est = np.sum((jv * probes.reshape(xs.shape)).reshape(P, B, -1), axis=2)     # (P, B)
    return s[:B], est.mean(axis=0)


# --- the likelihood ---------------------------------------------------------------------------------
def _check_args(sde, x, divergence, probes, probe, rtol, atol, t_min):
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {DIVERGENCES}; got {divergence!r}")
    if probe not in PROBES:
        raise ValueError(f"probe must be one of {PROBES}; got {probe!r}")
    check_int(probes, "probes", lo=1)
    check_real(rtol, "rtol", lo=0, lo_open=True)
    check_real(atol, "atol", lo=0, lo_open=True)
    check_real(t_min, "t_min", lo=0, hi=sde.T, lo_open=True, hi_open=True)
    x = check_array_float(x, "x")
    if x.ndim < 2 or x.shape[0] < 1:
        raise ValueError(f"x must have shape (B, ...) with B >= 1; got {x.shape}")
    return x


def log_likelihood(sde, score_fn, x, rng, divergence="hutchinson", probes=1, probe="rademacher",
                   rtol=1e-5, atol=1e-5, t_min=1e-5, method="RK45", probe_vectors=None, route="auto"):
    """log p_{t_min}(x) per sample by eq. (1), and the NFE.

    x (B, ...) float; score_fn JVP- or VJP-capable, `route` the product the trace takes
    ("auto": the VJP where score_fn has one; see the module docstring). The joint state
    [x (B D), delta (B)] is one solve_ivp system from t = t_min to T (score_sde's
    likelihood.py, whose eps = 1e-5 is the default here). Hutchinson probes (P, B, ...) are drawn
    once from `rng`, unless given as `probe_vectors` (probes, B, ...) (then rng is not used);
    "exact" draws nothing. -> (logp (B,) float64, nfe int).
    """
    x = _check_args(sde, x, divergence, probes, probe, rtol, atol, t_min)
    route = resolve_route(score_fn, route)
    B, shape, D = x.shape[0], x.shape, int(np.prod(x.shape[1:]))
    v = None
    if divergence == "hutchinson" and probe_vectors is not None:
        v = np.asarray(probe_vectors, dtype=np.float64)
        if v.shape != (probes,) + shape:
            raise ValueError(f"probe_vectors must have shape {(probes,) + shape}; got {v.shape}")
    elif divergence == "hutchinson":
        v = sample_probes((probes,) + shape, check_rng(rng), probe)

    def rhs(t, y):
        xt = y[:B * D].reshape(shape)
        if v is None:
            s, tr = divergence_exact(score_fn, xt, t, route)
        else:
            s, tr = divergence_hutchinson(score_fn, xt, t, v, route)
        g2 = float(sde.diffusion(np.float64(t))) ** 2
        dx = sde.probability_flow_drift(xt, t, s)                       # f - g^2/2 s
        ddelta = -float(sde.a(np.float64(t))) * D - 0.5 * g2 * tr        # div f~
        return np.concatenate([dx.ravel(), ddelta])

    y0 = np.concatenate([x.ravel(), np.zeros(B)])
    sol = solve_ivp(rhs, (t_min, sde.T), y0, method=method, rtol=rtol, atol=atol)
    if not sol.success:
        raise FloatingPointError(f"the probability-flow ODE did not integrate: {sol.message}")
    z, delta = sol.y[:B * D, -1].reshape(shape), sol.y[B * D:, -1]
    return sde.prior_logp(z) + delta, int(sol.nfev)


# --- bits per dimension -------------------------------------------------------------------------------
def dequantize(pixels, rng, data_range=(-1.0, 1.0)):
    """Uniform dequantisation of 8-bit pixels p (any shape, integers 0..255) onto the model's
    range: y = lo + (hi - lo) (p + u) / 256, u ~ U[0, 1) (score_sde run_lib.py)."""
    p = np.asarray(pixels)
    if p.size and (not np.all(np.isfinite(p)) or p.min() < 0 or p.max() > 255 or np.any(p != np.round(p))):
        raise ValueError("pixels must be integers in 0..255")
    lo, hi = data_range
    return lo + (hi - lo) * (p.astype(np.float64) + rng.uniform(0.0, 1.0, p.shape)) / 256.0


def bits_per_dim(logp, dim, data_range=(-1.0, 1.0)):
    """Eq. (2): -logp / (D ln 2) + log2(256 / (hi - lo)); logp of the dequantised images."""
    lo, hi = data_range
    return -np.asarray(logp, dtype=np.float64) / (dim * math.log(2)) + math.log2(256.0 / (hi - lo))


def image_bits_per_dim(model, meta, pixels, rng, batch=100, divergence="hutchinson", probes=1,
                       probe="rademacher", rtol=1e-5, atol=1e-5, t_min=1e-5, log=None, route="auto"):
    """Bits/dim (eq. 2) of 8-bit images under an eps-model checkpoint (refdiff.checkpoint.load_model),
    through the VP SDE of its DDPM chain (refdiff.solvers.continuous_sde: a cosine chain has
    none, ValueError). pixels (n, ...) integers 0..255, dequantised with `rng`, then `batch`
    images per ODE solve, the trace by `route` (resolve_route). -> dict(bpd (n,), nfe [one per
    batch], route: the one taken)."""
    sde, sf, pixels, shape1 = _image_setup(model, meta, pixels, batch)
    route = resolve_route(sf, route)
    x = dequantize(pixels, rng).reshape((pixels.shape[0],) + shape1)
    D = int(np.prod(shape1))
    bpd, nfes = [], []
    for start in range(0, x.shape[0], batch):
        logp, nfe = log_likelihood(sde, sf, x[start:start + batch], rng, divergence=divergence, probes=probes,
                                   probe=probe, rtol=rtol, atol=atol, t_min=t_min, route=route)
        bpd.append(bits_per_dim(logp, D))
        nfes.append(nfe)
        if log:
            done = np.concatenate(bpd)
            log(f"likelihood {len(done)}/{x.shape[0]} images: bits/dim {done.mean():.4f} (NFE {nfe})")
    return dict(bpd=np.concatenate(bpd), nfe=nfes, route=route)


def _image_setup(model, meta, pixels, batch):
    """image_bits_per_dim's checks -> (VP SDE, JVP-capable score, pixels array, one image's shape)."""
    from .ddpm import model_input_shape
    from .solvers import continuous_sde

    sde = continuous_sde(meta, "the likelihood")
    if getattr(model, "kind", None) != "eps":
        raise ValueError(f"model {getattr(model, 'name', model)!r} is not a noise predictor (kind 'eps')")
    check_int(batch, "batch", lo=1)
    pixels = np.asarray(pixels)
    shape1 = model_input_shape(model)
    if pixels.ndim < 2 or int(np.prod(pixels.shape[1:])) != int(np.prod(shape1)):
        raise ValueError(f"pixels must be (n, ...) images of {int(np.prod(shape1))} values for this model; "
                         f"got shape {pixels.shape}")
    return sde, model_score(model, sde), pixels, shape1


def split_image_bits_per_dim(comm, model, meta, pixels, seed, batch=100, divergence="hutchinson", probes=1,
                             probe="rademacher", rtol=1e-5, atol=1e-5, t_min=1e-5, log=None, route="auto"):
    """image_bits_per_dim over the ranks of `comm` (refdiff.distributed), with one random
    stream per image: image k draws its dequantisation noise, then its probes (probes, ...),
    from default_rng([seed, k]) (ImageStreams). The ODE solves are the same batches of
    `batch` images as in one process (images [j batch, (j + 1) batch)), whole batches split
    over the ranks (split_rows): RK45's step sizes depend on the whole batch, so a batch is
    never cut, and every number of ranks (1 included) gives the same bits/dim, bit for bit.
    -> dict(bpd (n,), nfe [one per batch], route) on rank 0, None on the others."""
    from .distributed import ImageStreams, split_rows

    sde, sf, pixels, shape1 = _image_setup(model, meta, pixels, batch)
    route = resolve_route(sf, route)
    D = int(np.prod(shape1))

    def share(lo, hi):
        bpd, nfe = [], []
        for s in range(lo, hi, batch):
            e = min(s + batch, hi)
            streams = ImageStreams(seed, range(s, e))
            x = dequantize(pixels[s:e], streams).reshape((e - s,) + shape1)
            v = None
            if divergence == "hutchinson":      # drawn (B, probes, ...): one row per image, then (probes, B, ...)
                v = np.ascontiguousarray(np.moveaxis(sample_probes((e - s, probes) + shape1, streams, probe), 1, 0))
            logp, n = log_likelihood(sde, sf, x, None, divergence=divergence, probes=probes, probe=probe, rtol=rtol,
                                     atol=atol, t_min=t_min, probe_vectors=v, route=route)
            bpd.append(bits_per_dim(logp, D))
            nfe.append(np.full(e - s, n, dtype=np.int64))
            if log:
                log(f"likelihood: images {lo}..{e - 1} of this rank's {lo}..{hi - 1} done (NFE {n})")
        return np.concatenate(bpd), np.concatenate(nfe)

    out = split_rows(comm, share, pixels.shape[0], "the likelihood ODE solves", unit=batch)
    if out is None:
        return None
    bpd, nfe = out
    return dict(bpd=bpd, nfe=[int(v) for v in nfe[::batch]], route=route)


@dataclass
class LikelihoodConfig:
    checkpoint: str                     # a checkpoint.npz of an eps-model (`refdiff train`)
    data: str = "mnist5k"               # image source (refdiff.data.images.load_images)
    split: str = "heldout"              # train | heldout
    n: int = 500                        # the first n images of the split
    batch: int = 100                    # images per ODE solve
    divergence: str = "hutchinson"      # or "exact" (one JVP per pixel)
    probes: int = 1                     # Hutchinson probes per image
    probe: str = "rademacher"           # or "gaussian"
    rtol: float = 1e-5                  # RK45 tolerances (score_sde's defaults)
    atol: float = 1e-5
    t_min: float = 1e-5                 # where the ODE starts (score_sde's eps)
    route: str = "auto"                 # the trace's Jacobian product: vjp (backward) | jvp (forward mode) | auto
    seed: int = 0                       # dequantisation noise and probes
    use_ema: bool = True
    backend: str = "numpy"


def likelihood_to_dir(cfg, out_dir, log=None, comm=None):
    """What `refdiff likelihood` does: bits/dim of cfg.n real images under cfg.checkpoint, written
    to out_dir/metrics.json (mean, standard error over the images, NFE per batch, the config),
    atomically, holding the directory's RunLock. -> the metrics dict. comm (under mpirun): the
    ODE solves split over its ranks with per-image streams (split_image_bits_per_dim); rank 0
    alone writes, the others return None."""
    from . import io
    from .data.images import load_images
    from .distributed import SingleProcess, on_root
    from .generate import load_generator

    check_int(cfg.n, "n", lo=1)
    check_int(cfg.batch, "batch", lo=1)
    solves = -(-cfg.n // cfg.batch)
    if comm is not None and solves < comm.size:        # the same refusal on every rank
        fix = f"--batch <= {cfg.n // comm.size} or fewer ranks" if cfg.n >= comm.size else "at most n ranks"
        raise ValueError(f"n = {cfg.n} images in batches of {cfg.batch} make {solves} ODE solve(s), fewer than the "
                         f"{comm.size} ranks (each takes whole solves): use {fix}")
    root = comm is None or comm.is_root
    with on_root(io.output_run(out_dir, log=log), comm or SingleProcess(), out_dir) as out:   # rank 0 writes
        model, meta, info = load_generator(cfg.checkpoint, want="eps", use_ema=cfg.use_ema, backend=cfg.backend)
        x, _ = load_images(cfg.data, cfg.split)
        if cfg.n > len(x):
            raise ValueError(f"n = {cfg.n} is more than the {len(x)} images of {cfg.data} {cfg.split}")
        pixels = np.round((x[:cfg.n].astype(np.float64) + 1.0) * 127.5).astype(np.int64)   # back to 0..255
        t0 = time.perf_counter()
        kw = dict(batch=cfg.batch, divergence=cfg.divergence, probes=cfg.probes, probe=cfg.probe, rtol=cfg.rtol,
                  atol=cfg.atol, t_min=cfg.t_min, log=log, route=cfg.route)
        if comm is None:
            res = image_bits_per_dim(model, meta, pixels, np.random.default_rng(cfg.seed), **kw)
        else:
            res = split_image_bits_per_dim(comm, model, meta, pixels, cfg.seed, **kw)
            info.update(ranks=comm.size, streams="per image: default_rng([seed, k])")
        if not root:
            return None
        bpd = res["bpd"]
        info.update(bits_per_dim_mean=float(bpd.mean()),
                    bits_per_dim_se=float(bpd.std(ddof=1) / math.sqrt(len(bpd))) if len(bpd) > 1 else None,
                    nfe_per_batch=res["nfe"], nfe_mean=float(np.mean(res["nfe"])),
                    route=res["route"],
                    seconds=time.perf_counter() - t0, config=dataclasses.asdict(cfg),
                    convention="uniform dequantisation (p + u) / 256 onto [-1, 1); bpd = -logp / (D ln 2) + 7 "
                               "(score_sde likelihood.py / run_lib.py, centred data)")
        io.write_json(os.path.join(out, "metrics.json"), info)
    return info


__all__ = ["DIVERGENCES", "PROBES", "ROUTES", "resolve_route", "model_score", "mixture_score", "divergence_exact",
           "divergence_hutchinson", "sample_probes", "log_likelihood", "dequantize", "bits_per_dim",
           "image_bits_per_dim", "split_image_bits_per_dim", "LikelihoodConfig", "likelihood_to_dir"]
