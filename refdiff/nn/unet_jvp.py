"""Forward mode for the UNet: `forward_jvp` / `backward_jvp` as a mixin (reference).

    class UNet(UNetJVP, Model): ...          # or, without touching unet.py:
    class JVPUNet(UNetJVP, UNet): pass

`forward_jvp(x, t, v)` returns eps_theta(x, t) and its directional derivative
(d eps_theta / dx) v; `backward_jvp(deps, deps_dot)` returns the gradient of
<eps, deps> + <eps_dot, deps_dot> with respect to x and accumulates the parameter gradients,
through the primal and the tangent pass. Sliced score matching needs exactly that
(refdiff.losses.ssm; report ch. 4).

The methods mirror refdiff.nn.unet.UNet.forward step for step (same parameter names, same
order of ops, same stage plan `self.stages` and sizes `self.sizes`), replacing each op by its
tangent pair from refdiff.nn.tangent: conv2d, conv_transpose2d, silu, group_norm, concat and
the time-embedding add. The time MLPs do not depend on x: their tangent is zero, so they run
the plain primal pairs and their gradients come from the primal upstream only. They use only
what a UNet holds: `params`, `config`, `stages`, `sizes`, `ops`, `accumulate`, `check_input`.
"""
from __future__ import annotations

import numpy as np

from .tangent import tangent_ops


def _num_groups(channels, max_groups):
    from .unet import num_groups   # late import: unet.py imports this module
    return num_groups(channels, max_groups)


class UNetJVP:
    """Mixin: forward-mode derivative and its adjoint for refdiff.nn.unet.UNet."""

    def forward_jvp(self, x, t, v):
        """x, v (B, C, H, W), t (B,) -> (eps_theta (B, C, H, W), (d eps_theta/dx) v (B, C, H, W))."""
        F, T, c = self.ops, tangent_ops(self.ops), self.config
        s = c["image_size"]
        x, v = F.xp.asarray(x), F.xp.asarray(v)
        self.check_input(x, (c["in_channels"], s, s), t)
        if tuple(v.shape) != tuple(x.shape):
            raise ValueError(f"model {self.name!r}: the direction v must have the shape of x {tuple(x.shape)}; "
                             f"got {tuple(v.shape)}")
        t_host = np.asarray(F.to_numpy(t), dtype=np.float64)
        if not np.all(np.isfinite(t_host)):
            raise ValueError(f"model {self.name!r}: t contains NaN or Inf")
        h, hd = x.astype(self.dtype, copy=False), v.astype(self.dtype, copy=False)
        emb = F.time_embedding(t_host * c["time_scale"], c["emb_dim"], dtype=self.dtype)
        tape, skips = [], []
        for k in range(len(c["channels"])):
            h, hd = self._stage_jvp(f"enc.{k}", h, hd, emb, tape)
            skips.append((h, hd))
            tape.append(("skip", k, None))
            h, hd = self._resample_jvp(f"down.{k}", h, hd, self.sizes[k] % 2 == 1, False, tape)
        h, hd = self._stage_jvp("mid", h, hd, emb, tape)
        for k in reversed(range(len(c["channels"]))):
            h, hd = self._resample_jvp(f"up.{k}", h, hd, self.sizes[k] % 2 == 1, True, tape)
            h, hd, cache = T.concat_jvp_forward([skips[k][0], h], [skips[k][1], hd], axis=1)
            tape.append(("concat", k, cache))
            h, hd = self._stage_jvp(f"dec.{k}", h, hd, emb, tape)
        y, yd = self._conv_jvp("out", h, hd, 1, 1, False, tape)
        self._jvp_skip = None
        if c.get("input_skip"):                       # eps = c(t) x + net: tangent c(t) v + net's
            self._jvp_skip = self.skip_coefficient(t_host)
            y = y + self._jvp_skip * x.astype(self.dtype, copy=False)
            yd = yd + self._jvp_skip * v.astype(self.dtype, copy=False)
        self._jvp_tape, self._jvp_out_shape = tape, tuple(y.shape)
        return y, yd

    def _stage_jvp(self, name, h, hd, emb, tape):
        F, T, p = self.ops, tangent_ops(self.ops), self.params
        a, lin0 = F.linear_forward(emb, p[f"{name}.time.0.weight"], p[f"{name}.time.0.bias"])
        a, act = F.silu_forward(a)
        v, lin2 = F.linear_forward(a, p[f"{name}.time.2.weight"], p[f"{name}.time.2.bias"])
        h, hd, add = T.add_channel_bias_jvp_forward(h, hd, v)      # v has no tangent
        tape.append(("time", f"{name}.time", (lin0, act, lin2, add)))
        for j, (c_in, _, use_norm) in enumerate(self.stages[name]):
            prefix = f"{name}.blocks.{j}"
            if use_norm:
                g = _num_groups(c_in, self.config["max_groups"])
                h, hd, cache = T.group_norm_jvp_forward(h, hd, g, p[prefix + ".norm.weight"],
                                                        p[prefix + ".norm.bias"])
                tape.append(("group_norm", prefix + ".norm", cache))
            h, hd = self._silu_jvp(*self._conv_jvp(prefix + ".conv1", h, hd, 1, 1, False, tape), tape)
            h, hd = self._silu_jvp(*self._conv_jvp(prefix + ".conv2", h, hd, 1, 1, False, tape), tape)
        return h, hd

    def _resample_jvp(self, name, h, hd, odd, transpose, tape):
        """As UNet._resample: down [Conv(2,1) -> SiLU ->] Conv(4,2,1); up ConvT(4,2,1) [-> SiLU -> ConvT(2,1)]."""
        halve, shrink = (2, 1), (1, 0)
        if not odd:
            return self._conv_jvp(name + ".0", h, hd, *halve, transpose, tape)
        first, second = (halve, shrink) if transpose else (shrink, halve)
        h, hd = self._silu_jvp(*self._conv_jvp(name + ".0", h, hd, *first, transpose, tape), tape)
        return self._conv_jvp(name + ".2", h, hd, *second, transpose, tape)

    def _conv_jvp(self, name, h, hd, stride, padding, transpose, tape):
        op = "conv_transpose2d" if transpose else "conv2d"
        fwd = getattr(tangent_ops(self.ops), op + "_jvp_forward")
        h, hd, cache = fwd(h, hd, self.params[name + ".weight"], self.params[name + ".bias"], stride, padding)
        tape.append((op, name, cache))
        return h, hd

    def _silu_jvp(self, h, hd, tape):
        h, hd, cache = tangent_ops(self.ops).silu_jvp_forward(h, hd)
        tape.append(("silu", None, cache))
        return h, hd

    def backward_jvp(self, deps, deps_dot):
        """Gradient of <eps, deps> + <eps_dot, deps_dot>: returns d/dx (B, C, H, W); the
        parameter gradients accumulate into self.grads."""
        if getattr(self, "_jvp_tape", None) is None:
            raise RuntimeError("backward_jvp called before forward_jvp")
        F, T = self.ops, tangent_ops(self.ops)
        dy, dyd = F.xp.asarray(deps), F.xp.asarray(deps_dot)
        for name, a in (("deps", dy), ("deps_dot", dyd)):
            if tuple(a.shape) != self._jvp_out_shape:
                raise ValueError(f"model {self.name!r}: {name} must have the output's shape "
                                 f"{self._jvp_out_shape}; got {tuple(a.shape)}")
        dy, dyd = dy.astype(self.dtype, copy=False), dyd.astype(self.dtype, copy=False)
        dy_out, d_skips = dy, {}
        for op, name, cache in reversed(self._jvp_tape):
            if op == "skip":                          # the encoder output also fed dec.k
                ds, dsd = d_skips.pop(name)
                dy, dyd = dy + ds, dyd + dsd
            elif op == "concat":
                (ds, dy), (dsd, dyd) = T.concat_jvp_backward(dy, dyd, cache)
                d_skips[name] = (ds, dsd)
            elif op == "time":
                dy, dyd = self._time_jvp_backward(name, dy, dyd, cache)
            elif op == "silu":
                dy, dyd = T.silu_jvp_backward(dy, dyd, cache)
            else:                                     # conv2d, conv_transpose2d, group_norm
                dy, dyd, dw, db = getattr(T, op + "_jvp_backward")(dy, dyd, cache)
                self.accumulate(name + ".weight", dw)
                self.accumulate(name + ".bias", db)
        if getattr(self, "_jvp_skip", None) is not None:   # c(t) v does not depend on x
            dy = dy + self._jvp_skip * dy_out
        self._jvp_tape = None
        return dy

    def _time_jvp_backward(self, name, dh, dhd, caches):
        F, acc = self.ops, self.accumulate
        lin0, act, lin2, add = caches
        dh, dhd, dv = tangent_ops(self.ops).add_channel_bias_jvp_backward(dh, dhd, add)
        da, dw, db = F.linear_backward(dv, lin2)
        acc(name + ".2.weight", dw), acc(name + ".2.bias", db)
        _, dw, db = F.linear_backward(F.silu_backward(da, act), lin0)
        acc(name + ".0.weight", dw), acc(name + ".0.bias", db)
        return dh, dhd
