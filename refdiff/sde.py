"""Forward SDEs and the discrete DDPM chain (reference).

Every continuous SDE here is linear in x,

    dX = f(X, t) dt + g(t) dW,    f(x, t) = -a(t) x,

so its transition kernel is Gaussian and known in closed form:

    p_{t|0}(x | x0) = N(gamma_t x0, std_t^2 I).

Each class offers the same methods (after score_sde's `sde_lib.py`, Song et al. 2021):
`drift`, `diffusion`, `marginal_coeffs`, `marginal`, `prior_sample`, `prior_logp`,
`reverse_drift`. Shapes: `x` is (B, ...) of any rank (2-D points (B, D) and images
(B, C, H, W) alike); `t` is a scalar or a (B,) array, broadcast by `bcast`.

Reverse time (report eq. 2.6; Anderson 1982). For Y_s = X_{T-s},

    dY = [-f(Y, T-s) + g(T-s)^2 grad log p_{T-s}(Y)] ds + g(T-s) dW.

Written in forward time as score_sde does, the reverse SDE is
`dX = [f(X,t) - g(t)^2 score(X,t)] dt + g(t) dW_bar` integrated with dt < 0;
`reverse_drift` returns that bracket, `f - g^2 score`.

Validation (refdiff._checks): non-positive rates, sigma_min >= sigma_max, parameters whose
coefficients overflow float64, t outside [0, T] and shape mismatches raise ValueError naming
the parameter and the allowed range; a string where a number is due raises TypeError.
"""
from __future__ import annotations

import inspect
import math

import numpy as np

from ._checks import check_array_float, check_int, check_positive_finite, check_real, check_rng


def bcast(t, x):
    """Reshape a scalar or per-sample `t` (B,) to broadcast against x (B, ...)."""
    t = np.asarray(t, dtype=x.dtype if np.issubdtype(x.dtype, np.floating) else np.float64)
    if t.ndim == 0:
        return t
    if t.ndim != 1 or t.shape[0] != x.shape[0]:
        raise ValueError(f"t must be a scalar or have shape ({x.shape[0]},) to match x "
                         f"of shape {x.shape}; got t of shape {t.shape}")
    return t.reshape((-1,) + (1,) * (x.ndim - 1))


def _overflows(*values):
    return not all(math.isfinite(v) for v in values)


class SDE:
    """Base class: subclasses define `a(t)` (drift rate), `diffusion(t)` and
    `marginal_coeffs(t)`; everything else is derived here."""

    name = "sde"

    def __init__(self, T=1.0):
        self.T = check_positive_finite(T, "T")

    # -- checks ------------------------------------------------------------------------
    def check_t(self, t):
        t = check_array_float(t, "t", finite=False)
        if not np.all(np.isfinite(t)):
            raise ValueError(f"t must be finite and in [0, T={self.T}]; got non-finite values")
        if np.any(t < 0) or np.any(t > self.T * (1 + 1e-9)):
            raise ValueError(f"t must lie in [0, T={self.T}]; got values in "
                             f"[{t.min():.6g}, {t.max():.6g}]")
        return t

    # -- the SDE -----------------------------------------------------------------------
    def a(self, t):
        raise NotImplementedError

    def drift(self, x, t):
        """f(x, t) = -a(t) x."""
        t = self.check_t(t)
        return -bcast(self.a(t), x) * x

    def diffusion(self, t):
        """g(t), same shape as t."""
        raise NotImplementedError

    def marginal_coeffs(self, t):
        """(gamma_t, std_t): p_{t|0}(x|x0) = N(gamma_t x0, std_t^2 I). Same shape as t."""
        raise NotImplementedError

    def marginal(self, x0, t):
        """Mean and std of p_{t|0}(. | x0); std broadcasts against x0."""
        t = self.check_t(t)
        gamma, std = self.marginal_coeffs(t)
        return bcast(gamma, x0) * x0, bcast(std, x0)

    def prior_std(self):
        """Std of the isotropic Gaussian prior N(0, prior_std^2 I) approximating p_T."""
        return 1.0

    def prior_sample(self, shape, rng):
        return self.prior_std() * check_rng(rng).standard_normal(shape)

    def prior_logp(self, z):
        """log N(z; 0, prior_std^2 I), summed over all but the batch axis -> (B,)."""
        s2 = self.prior_std() ** 2
        d = np.prod(z.shape[1:])
        sq = np.sum(z.reshape(z.shape[0], -1) ** 2, axis=1)
        return -0.5 * d * np.log(2 * np.pi * s2) - 0.5 * sq / s2

    def reverse_drift(self, x, t, score):
        """f(x, t) - g(t)^2 score: the drift of the reverse SDE in forward time (dt < 0).

        `score` is an array shaped like x (the score already evaluated at (x, t)).
        """
        if score.shape != x.shape:
            raise ValueError(f"score must have the shape of x {x.shape}; got {score.shape}")
        t = self.check_t(t)
        g = bcast(self.diffusion(t), x)
        return self.drift(x, t) - g * g * score

    def probability_flow_drift(self, x, t, score):
        """f - g^2/2 score: drift of the probability-flow ODE (Song et al. 2021, eq. 13)."""
        t = self.check_t(t)
        g = bcast(self.diffusion(t), x)
        return self.drift(x, t) - 0.5 * g * g * score

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items() if k != "name")
        return f"{type(self).__name__}({args})"

    def config(self):
        raise NotImplementedError


class OU(SDE):
    """Ornstein-Uhlenbeck: dX = -beta X dt + sigma dW (report §2.4, eq. 2.9).

    p_{t|0} = N(e^{-beta t} x0, sigma^2/(2 beta) (1 - e^{-2 beta t}) I); the stationary
    law is N(0, sigma^2/(2 beta) I), which is N(0, I) for the default sigma = sqrt(2 beta).
    Note: the report's ring uses beta = 0.1, T = 1, where e^{-beta T} = 0.90: p_T is then
    far from the prior, and sampling from the prior cannot give back the data. refdiff's
    ring uses beta = 5 (e^{-5} = 0.007), which mixes like the VP SDE's defaults.
    """

    name = "ou"

    def __init__(self, beta, sigma=None, T=1.0):
        super().__init__(T)
        self.beta = check_positive_finite(beta, "beta")
        if _overflows(2 * self.beta):
            raise ValueError(f"beta = {beta!r} is too large: 2 beta overflows float64")
        self.sigma = math.sqrt(2 * self.beta) if sigma is None else check_positive_finite(sigma, "sigma")
        if _overflows(self.sigma * self.sigma, self.sigma * self.sigma / (2 * self.beta)):
            raise ValueError(f"sigma = {sigma!r} is too large for beta = {beta!r}: sigma^2 or the stationary "
                             f"variance sigma^2 / (2 beta) overflows float64")

    def a(self, t):
        return np.full_like(np.asarray(t, dtype=np.float64), self.beta)

    def diffusion(self, t):
        return np.full_like(self.check_t(t), self.sigma)

    def marginal_coeffs(self, t):
        t = self.check_t(t)
        gamma = np.exp(-self.beta * t)
        var = self.sigma ** 2 / (2 * self.beta) * -np.expm1(-2 * self.beta * t)
        return gamma, np.sqrt(var)

    def prior_std(self):
        return self.sigma / math.sqrt(2 * self.beta)

    def config(self):
        return {"name": self.name, "beta": self.beta, "sigma": self.sigma, "T": self.T}


class _BetaLinear(SDE):
    """Shared by VP and sub-VP: beta(t) = beta_min + t/T (beta_max - beta_min)."""

    def __init__(self, beta_min=0.1, beta_max=20.0, T=1.0):
        super().__init__(T)
        self.beta_min = check_positive_finite(beta_min, "beta_min")
        self.beta_max = check_positive_finite(beta_max, "beta_max")
        if self.beta_max < self.beta_min:
            raise ValueError(f"beta_max must be >= beta_min; got beta_min={beta_min}, "
                             f"beta_max={beta_max}")
        if _overflows(self.beta_max - self.beta_min, 0.25 * self.T * (self.beta_max + self.beta_min)):
            raise ValueError(f"beta_min = {beta_min!r}, beta_max = {beta_max!r} with T = {T!r}: "
                             f"int_0^T beta overflows float64")

    def beta(self, t):
        return self.beta_min + np.asarray(t, dtype=np.float64) / self.T * (self.beta_max - self.beta_min)

    def a(self, t):
        return 0.5 * self.beta(t)

    def discrete_betas(self, num_steps=1000):
        """beta_i = linspace(beta_min / N, beta_max / N, N): the DDPM chain this SDE is the limit
        of (score_sde's VPSDE.discrete_betas; 1e-4 -> 0.02 for VP(0.1, 20), N = 1000)."""
        N = check_int(num_steps, "num_steps", lo=1)
        return np.linspace(self.beta_min / N, self.beta_max / N, N)

    def log_gamma(self, t):
        """log of the mean coefficient: -1/2 int_0^t beta(s) ds."""
        t = np.asarray(t, dtype=np.float64)
        return -0.25 * t * t / self.T * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min

    def config(self):
        return {"name": self.name, "beta_min": self.beta_min, "beta_max": self.beta_max, "T": self.T}


class VP(_BetaLinear):
    """Variance preserving: dX = -1/2 beta(t) X dt + sqrt(beta(t)) dW (Song et al. 2021).

    The continuous limit of DDPM: beta_min = 0.1, beta_max = 20 is the linear schedule
    1e-4 -> 0.02 over 1000 steps. p_{t|0} = N(gamma_t x0, (1 - gamma_t^2) I).
    """

    name = "vp"

    def diffusion(self, t):
        return np.sqrt(self.beta(self.check_t(t)))

    def marginal_coeffs(self, t):
        lg = self.log_gamma(self.check_t(t))
        return np.exp(lg), np.sqrt(-np.expm1(2 * lg))


class SubVP(_BetaLinear):
    """Sub-VP: same drift as VP, g(t)^2 = beta(t) (1 - e^{-2 int_0^t beta}) (Song et al. 2021).

    p_{t|0} = N(gamma_t x0, (1 - gamma_t^2)^2 I): its variance is below VP's at every t.
    """

    name = "subvp"

    def diffusion(self, t):
        t = self.check_t(t)
        return np.sqrt(self.beta(t) * -np.expm1(4 * self.log_gamma(t)))

    def marginal_coeffs(self, t):
        lg = self.log_gamma(self.check_t(t))
        return np.exp(lg), -np.expm1(2 * lg)


class VE(SDE):
    """Variance exploding: dX = sqrt(d sigma(t)^2/dt) dW, sigma(t) = smin (smax/smin)^(t/T).

    p_{t|0} = N(x0, (sigma(t)^2 - sigma_min^2) I) exactly (score_sde approximates the
    variance by sigma(t)^2); the prior is N(0, sigma_max^2 I).
    """

    name = "ve"

    def __init__(self, sigma_min=0.01, sigma_max=5.0, T=1.0):
        super().__init__(T)
        self.sigma_min = check_positive_finite(sigma_min, "sigma_min")
        self.sigma_max = check_positive_finite(sigma_max, "sigma_max")
        if self.sigma_min >= self.sigma_max:
            raise ValueError(f"sigma_min must be < sigma_max; got sigma_min={sigma_min}, "
                             f"sigma_max={sigma_max}")
        ratio = self.sigma_max / self.sigma_min
        g2_max = 2 * math.log(ratio) / self.T * self.sigma_max * self.sigma_max      # g(T)^2
        if _overflows(ratio, self.sigma_max * self.sigma_max, g2_max):
            raise ValueError(f"sigma_max = {sigma_max!r} with sigma_min = {sigma_min!r} and T = {T!r}: "
                             f"sigma_max / sigma_min, sigma_max^2 or g(T)^2 overflows float64")

    def sigma(self, t):
        return self.sigma_min * (self.sigma_max / self.sigma_min) ** (np.asarray(t, dtype=np.float64) / self.T)

    def a(self, t):
        return np.zeros_like(np.asarray(t, dtype=np.float64))

    def diffusion(self, t):
        t = self.check_t(t)
        return self.sigma(t) * math.sqrt(2 * math.log(self.sigma_max / self.sigma_min) / self.T)

    def marginal_coeffs(self, t):
        t = self.check_t(t)
        s = self.sigma(t)
        return np.ones_like(t), np.sqrt(np.maximum(s * s - self.sigma_min ** 2, 0.0))

    def prior_std(self):
        return self.sigma_max

    def config(self):
        return {"name": self.name, "sigma_min": self.sigma_min, "sigma_max": self.sigma_max, "T": self.T}


SDES = {"ou": OU, "vp": VP, "ve": VE, "subvp": SubVP}


def make_sde(name, **kwargs):
    """Build an SDE by name (`ou`, `vp`, `ve`, `subvp`) with its parameters as keywords."""
    if name not in SDES:
        raise ValueError(f"unknown SDE {name!r}; choose one of {sorted(SDES)}")
    valid = list(inspect.signature(SDES[name]).parameters)
    unknown = sorted(set(kwargs) - set(valid))
    if unknown:
        raise TypeError(f"unknown parameter(s) {', '.join(unknown)} for SDE {name!r}; "
                        f"it takes {', '.join(valid)}")
    return SDES[name](**kwargs)


class DDPMSchedule:
    """The discrete DDPM chain (Ho et al. 2020; report §3.3.1).

    q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t I), t = 0..N-1 here (the paper's
    1..N shifted by one), alpha_bar_t = prod_{s<=t} (1 - beta_s), and
    q(x_t | x_0) = N(sqrt(alpha_bar_t) x0, (1 - alpha_bar_t) I).
    kind = "linear" (beta_start -> beta_end) or "cosine" (Nichol & Dhariwal 2021, s = 0.008,
    betas clipped at 0.999).
    """

    def __init__(self, num_steps=1000, beta_start=1e-4, beta_end=0.02, kind="linear"):
        self.num_steps, self.kind = check_int(num_steps, "num_steps", lo=1), kind
        self.beta_start, self.beta_end = check_real(beta_start, "beta_start"), check_real(beta_end, "beta_end")
        if kind == "linear":
            if not (0 < beta_start <= beta_end < 1):
                raise ValueError(f"linear schedule needs 0 < beta_start <= beta_end < 1; got "
                                 f"beta_start={beta_start}, beta_end={beta_end}")
            betas = np.linspace(beta_start, beta_end, num_steps, dtype=np.float64)
        elif kind == "cosine":
            s = 0.008
            u = np.arange(num_steps + 1, dtype=np.float64) / num_steps
            f = np.cos((u + s) / (1 + s) * np.pi / 2) ** 2
            betas = np.clip(1 - f[1:] / f[:-1], 0, 0.999)
        else:
            raise ValueError(f"schedule kind must be 'linear' or 'cosine'; got {kind!r}")
        self.betas = betas                          # (N,)
        self.alphas = 1.0 - betas                   # (N,)
        self.alpha_bars = np.cumprod(self.alphas)   # (N,)

    def check_t(self, t):
        t = np.asarray(t)
        if not np.issubdtype(t.dtype, np.integer):
            raise ValueError(f"DDPM timesteps must be integers in [0, {self.num_steps - 1}]; got dtype {t.dtype}")
        if np.any(t < 0) or np.any(t >= self.num_steps):
            raise ValueError(f"DDPM timesteps must lie in [0, {self.num_steps - 1}]; got "
                             f"values in [{t.min()}, {t.max()}]")
        return t

    def marginal_coeffs(self, t):
        ab = self.alpha_bars[self.check_t(t)]
        return np.sqrt(ab), np.sqrt(1.0 - ab)

    def marginal(self, x0, t):
        """Mean and std of q(x_t | x_0) (Ho et al. eq. 4)."""
        gamma, std = self.marginal_coeffs(t)
        return bcast(gamma, x0) * x0, bcast(std, x0)

    def config(self):
        return {"num_steps": self.num_steps, "beta_start": self.beta_start,
                "beta_end": self.beta_end, "kind": self.kind}
