"""Time-conditioned MLP noise-prediction network for low-dimensional data (reference).

    e    = time_embedding(t * time_scale, E)                     (B, E)
    temb = SiLU(W_t e + b_t)                                     (B, Ht)
    h_0  = x                                                     (B, D)
    h_k  = SiLU(W_k h_{k-1} + b_k + U_k temb + c_k),  k = 1..L   (B, H_k)
    y    = W_out h_L + b_out                                     (B, D)

The output is a noise prediction eps_theta(x, t); the score is -eps_theta / std_t
(report §3.2.2).

`forward_jvp(x, t, v)` also returns the directional derivative eps_dot = (d eps/dx) v by
forward mode (refdiff.nn.tangent), and `backward_jvp(deps, deps_dot)` back-propagates
through both, which is what sliced score matching needs (refdiff.losses.ssm). The time
branch does not depend on x: its tangent is zero and it runs the plain primal ops.
`time_scale` maps the SDE's t in [0, T] onto the range where the sinusoids vary (1000 / T
by default, the DDPM index range).
"""
from __future__ import annotations

import numpy as np

from .._checks import check_finite_times, check_int, check_positive_finite
from .base import Model
from .tangent import tangent_ops


class ScoreMLP(Model):
    kind = "eps"

    def __init__(self, dim=2, widths=(128, 128), emb_dim=64, temb_dim=128, time_scale=1000.0,
                 dtype=np.float32, seed=0, backend=None):
        if isinstance(widths, (str, bytes)) or not hasattr(widths, "__len__") or len(widths) == 0:
            raise ValueError(f"mlp: widths must be a non-empty list of integers >= 1; got {widths!r}")
        widths = tuple(check_int(w, "widths entries", lo=1) for w in widths)
        cfg = dict(dim=check_int(dim, "dim", lo=1), widths=list(widths), emb_dim=check_int(emb_dim, "emb_dim", lo=2),
                   temb_dim=check_int(temb_dim, "temb_dim", lo=1),
                   time_scale=check_positive_finite(time_scale, "time_scale"))
        super().__init__("mlp", cfg, dtype, seed, backend)
        self.add_linear("time", emb_dim, temb_dim)
        d_in = dim
        for k, w in enumerate(widths):
            self.add_linear(f"layers.{k}", d_in, w)
            self.add_linear(f"layers.{k}.temb", temb_dim, w)
            d_in = w
        self.add_linear("out", d_in, dim)
        self._caches = None
        self._jvp_caches = None

    def forward(self, x, t):
        """x (B, D), t (B,) -> eps_theta (B, D)."""
        F, p, c = self.ops, self.params, self.config
        self.check_input(x, (c["dim"],), t)
        t_host = np.asarray(F.to_numpy(t), dtype=np.float64)
        check_finite_times(t_host, f"model {self.name!r}")
        e = F.time_embedding(t_host * c["time_scale"], c["emb_dim"], dtype=self.dtype)
        a, lin_t = F.linear_forward(e, p["time.weight"], p["time.bias"])
        temb, act_t = F.silu_forward(a)
        h, layers = x, []
        for k in range(len(c["widths"])):
            z, lin = F.linear_forward(h, p[f"layers.{k}.weight"], p[f"layers.{k}.bias"])
            zt, lin_tk = F.linear_forward(temb, p[f"layers.{k}.temb.weight"], p[f"layers.{k}.temb.bias"])
            h, act = F.silu_forward(z + zt)
            layers.append((lin, lin_tk, act))
        y, lin_out = F.linear_forward(h, p["out.weight"], p["out.bias"])
        self._caches = (lin_t, act_t, layers, lin_out)
        return y

    def backward(self, dy):
        """dy (B, D) -> dx (B, D); parameter gradients accumulate into self.grads."""
        if self._caches is None:
            raise RuntimeError("backward called before forward")
        F, acc = self.ops, self.accumulate
        lin_t, act_t, layers, lin_out = self._caches
        dh, dw, db = F.linear_backward(dy, lin_out)
        acc("out.weight", dw), acc("out.bias", db)
        dtemb = 0
        for k in reversed(range(len(layers))):
            lin, lin_tk, act = layers[k]
            dz = F.silu_backward(dh, act)
            dtk, dw, db = F.linear_backward(dz, lin_tk)
            acc(f"layers.{k}.temb.weight", dw), acc(f"layers.{k}.temb.bias", db)
            dtemb = dtemb + dtk
            dh, dw, db = F.linear_backward(dz, lin)
            acc(f"layers.{k}.weight", dw), acc(f"layers.{k}.bias", db)
        da = F.silu_backward(dtemb, act_t)
        _, dw, db = F.linear_backward(da, lin_t)
        acc("time.weight", dw), acc("time.bias", db)
        self._caches = None
        return dh

    # -- forward mode, for sliced score matching ------------------------------------------------
    def forward_jvp(self, x, t, v):
        """x (B, D), t (B,), v (B, D) -> (eps_theta(x, t), (d eps_theta / dx) v), both (B, D)."""
        F, tan, p, c = self.ops, tangent_ops(self.ops), self.params, self.config
        self.check_input(x, (c["dim"],), t)
        if tuple(v.shape) != tuple(x.shape):
            raise ValueError(f"model {self.name!r}: the direction v must have the shape of x {tuple(x.shape)}; "
                             f"got {tuple(v.shape)}")
        t_host = np.asarray(F.to_numpy(t), dtype=np.float64)
        check_finite_times(t_host, f"model {self.name!r}")
        e = F.time_embedding(t_host * c["time_scale"], c["emb_dim"], dtype=self.dtype)
        a, lin_t = F.linear_forward(e, p["time.weight"], p["time.bias"])
        temb, act_t = F.silu_forward(a)
        h, hdot, layers = x, v, []
        for k in range(len(c["widths"])):
            z, zdot, lin = tan.linear_jvp_forward(h, hdot, p[f"layers.{k}.weight"], p[f"layers.{k}.bias"])
            zt, lin_tk = F.linear_forward(temb, p[f"layers.{k}.temb.weight"], p[f"layers.{k}.temb.bias"])
            z, zdot, add = tan.add_channel_bias_jvp_forward(z, zdot, zt)
            h, hdot, act = tan.silu_jvp_forward(z, zdot)
            layers.append((lin, lin_tk, add, act))
        y, ydot, lin_out = tan.linear_jvp_forward(h, hdot, p["out.weight"], p["out.bias"])
        self._jvp_caches = (lin_t, act_t, layers, lin_out)
        return y, ydot

    def backward_jvp(self, deps, deps_dot):
        """Gradient of <eps, deps> + <eps_dot, deps_dot>: returns d/dx (B, D); the parameter
        gradients (through the primal and the tangent pass) accumulate into self.grads."""
        if getattr(self, "_jvp_caches", None) is None:
            raise RuntimeError("backward_jvp called before forward_jvp")
        F, tan, acc = self.ops, tangent_ops(self.ops), self.accumulate
        lin_t, act_t, layers, lin_out = self._jvp_caches
        dh, dhdot, dw, db = tan.linear_jvp_backward(deps, deps_dot, lin_out)
        acc("out.weight", dw), acc("out.bias", db)
        dtemb = 0
        for k in reversed(range(len(layers))):
            lin, lin_tk, add, act = layers[k]
            dz, dzdot = tan.silu_jvp_backward(dh, dhdot, act)
            dz, dzdot, dzt = tan.add_channel_bias_jvp_backward(dz, dzdot, add)
            dtk, dw, db = F.linear_backward(dzt, lin_tk)
            acc(f"layers.{k}.temb.weight", dw), acc(f"layers.{k}.temb.bias", db)
            dtemb = dtemb + dtk
            dh, dhdot, dw, db = tan.linear_jvp_backward(dz, dzdot, lin)
            acc(f"layers.{k}.weight", dw), acc(f"layers.{k}.bias", db)
        da = F.silu_backward(dtemb, act_t)
        _, dw, db = F.linear_backward(da, lin_t)
        acc("time.weight", dw), acc("time.bias", db)
        self._jvp_caches = None
        return dh

    def __call__(self, x, t):
        return self.forward(x, t)
