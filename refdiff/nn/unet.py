"""UNet noise-prediction network of the report (appendix, fig. 4.1; the report's code), reference.

With c = channels (c_0..c_{L-1}), n = blocks per stage, E = emb_dim, m = mid_channels:

    emb      = time_embedding(t * time_scale, E)                          (B, E)
    stage    : h <- h + MLP(emb)[:, :, None, None], MLP = Linear(E,Ci)-SiLU-Linear(Ci,Ci)
               (Ci = the stage's input channels), then n blocks
    block    : GroupNorm(Ci) -> Conv3x3(Ci,Co,pad 1) -> SiLU -> Conv3x3(Co,Co,pad 1) -> SiLU
    enc.k    : stage in -> c_k -> ... -> c_k           (in = in_channels, then c_{k-1});  skip_k
    down.k   : size s even: Conv(c_k,c_k,4,2,1)                        s -> s/2
               size s odd : Conv(c_k,c_k,2,1) -> SiLU -> Conv(c_k,c_k,4,2,1)   s -> s-1 -> (s-1)/2
    mid      : stage c_{L-1} -> m -> ... -> m -> c_{L-1}
    up.k     : mirror of down.k: ConvT(c_k,c_k,4,2,1) [-> SiLU -> ConvT(c_k,c_k,2,1) if s odd]
    dec.k    : concat(skip_k, up) (2 c_k channels), stage 2c_k -> c_k -> c_{k-1} -> ... -> c_{k-1}
               (c_{-1} := c_0; n = 1: 2c_k -> c_{k-1}), for k = L-1 .. 0
    out      : Conv3x3(c_0, in_channels, pad 1), no activation: the noise prediction eps_theta.

The input GroupNorm: the first block (enc.0's) normalises the raw input image. With
in_channels = 1 that is one group per image, so the whole network is invariant to each
input's brightness and contrast, eps_theta(a x + b, t) = eps_theta(x, t) for a > 0 (also
checked numerically on a trained unet-seed: 1.5e-5 apart, GroupNorm's eps). It cannot see the
mean of x_t, so a sampler cannot correct the mean brightness of an image: the prior draw's
mean, amplified ~1/sqrt(abar_N) = 156x along the chain, saturates most images to all-black
or all-white (docs/mnist.md), and enc.0's time embedding, added before that norm,
is cancelled by it (zero gradient). input_norm=False skips that one norm (its 2 parameters
stay, unused, as final_norm's do): `unet-seed-fixed`, the report's network with that one
change. unet-seed keeps it, as the authors' code has it.

The other GroupNorms remove the mean and scale of every group of channels too, and with no
residual path the mean of x_t reaches the output only through nonlinear leaks (zero padding,
SiLU): measured on unet-seed-fixed after 2,500 steps, d mean(eps_theta) / d mean(x_t) = -0.01
at every t, where about 1 is right. input_skip=True adds c(t) x to the output (see
skip_coefficient): `unet-seed-skip` is unet-seed-fixed with that skip, no new parameters.

GroupNorm groups = the largest divisor of Ci that is <= max_groups. The very last block
(dec.0's) has a GroupNorm whose parameters exist but which is skipped when final_norm=False.
That is the one reading of the report's code (docs/report.md) that gives its exact count: with the norm's 2 c_0
parameters present, unet-seed (c = 10, 20, 40, 80, n = 3, m = 40, E = 100,
28 -> 14 -> 7 -> 3 -> 1) has 1,335,486 parameters; without them it would have 20 fewer. So
the authors' code builds that norm and bypasses it (PyTorch still counts it), and here its
20 parameters never get a gradient. Their 1,435,486 adds the frozen 1000 x 100 sinusoid
table, which here is computed on the fly.

Checked while written against an independent PyTorch build of the same network (weights
loaded by name): outputs and all gradients agree to float64 rounding.

Every op goes through the backend `self.ops`; forward records a tape of (op, name, cache)
that backward walks in reverse. In this block GroupNorm feeds a conv, not a SiLU, so the
fused group_norm_silu pair is not used here. predict is the inference forward (the
samplers'): the same network without a tape, each block as two fused ops (refdiff.nn.fused).
"""
from __future__ import annotations

import numpy as np

from .._checks import check_finite_times, check_int, check_real
from .base import Model
from .fused import fused_ops
from .unet_jvp import UNetJVP


def num_groups(channels, max_groups):
    """The largest divisor of `channels` that is <= max_groups (1, 5, 5, 8, 8 for 1, 10, 20, 40, 80)."""
    return max(g for g in range(1, min(channels, max_groups) + 1) if channels % g == 0)


class UNet(UNetJVP, Model):
    """(forward_jvp/backward_jvp for exact sliced score matching come from UNetJVP.)"""

    kind = "eps"

    def __init__(self, in_channels=1, image_size=28, channels=(10, 20, 40, 80), blocks=3, mid_channels=None,
                 emb_dim=100, time_scale=1000.0, max_groups=8, final_norm=False, input_norm=True,
                 input_skip=False, dtype=np.float32, seed=0, backend=None):
        channels = [check_int(c, "channels entries") for c in channels]
        mid = max(1, channels[-1] // 2) if mid_channels is None and channels else mid_channels
        cfg = dict(in_channels=check_int(in_channels, "in_channels"), image_size=check_int(image_size, "image_size"),
                   channels=channels, blocks=check_int(blocks, "blocks"),
                   mid_channels=check_int(mid or 0, "mid_channels"),
                   emb_dim=check_int(emb_dim, "emb_dim"), time_scale=check_real(time_scale, "time_scale"),
                   max_groups=check_int(max_groups, "max_groups"), final_norm=bool(final_norm),
                   input_norm=bool(input_norm), input_skip=bool(input_skip))
        self._check_config(cfg)
        super().__init__("unet", cfg, dtype, seed, backend)
        # spatial size at the input of each level, then at the bottleneck: s -> s // 2 (s/2 or (s-1)/2)
        self.sizes = [cfg["image_size"] // 2 ** k for k in range(len(channels) + 1)]
        self.stages = self._plan()
        self._build()
        self._tape, self._out_shape = None, None

    @staticmethod
    def _check_config(c):
        problems = []
        if not c["channels"] or min(c["channels"]) < 1:
            problems.append(f"channels must be a non-empty list of positive ints (got {c['channels']})")
        for key, lo in (("in_channels", 1), ("blocks", 1), ("mid_channels", 1), ("emb_dim", 2), ("max_groups", 1)):
            if c[key] < lo:
                problems.append(f"{key} must be >= {lo} (got {c[key]})")
        if not c["time_scale"] > 0:
            problems.append(f"time_scale must be finite and > 0 (got {c['time_scale']})")
        levels = len(c["channels"])
        if c["image_size"] // 2 ** levels < 1:    # each level's input must be >= 2 pixels wide
            problems.append(f"image_size {c['image_size']} cannot be halved {levels} times "
                            f"(it must be >= 2^{levels} = {2 ** levels})")
        if problems:
            raise ValueError("unet: " + "; ".join(problems))

    # -- architecture ----------------------------------------------------------------------
    def _plan(self):
        """name -> list of blocks (c_in, c_out, use_norm), encoder, mid, decoder order."""
        c, n = self.config["channels"], self.config["blocks"]
        stages, c_in = {}, self.config["in_channels"]
        for k, ck in enumerate(c):
            stages[f"enc.{k}"] = self._chain(c_in, [ck] * n)
            c_in = ck
        stages["mid"] = self._chain(c[-1], [self.config["mid_channels"]] * (n - 1) + [c[-1]])
        for k in reversed(range(len(c))):
            prev = c[k - 1] if k > 0 else c[0]
            outs = [prev] * n
            if n >= 2:
                outs[0] = c[k]
            stages[f"dec.{k}"] = self._chain(2 * c[k], outs)
        last = stages["dec.0"]
        last[-1] = (last[-1][0], last[-1][1], self.config["final_norm"])
        first = stages["enc.0"]
        first[0] = (first[0][0], first[0][1], self.config["input_norm"])
        return stages

    @staticmethod
    def _chain(c_in, outs):
        blocks = []
        for c_out in outs:
            blocks.append((c_in, c_out, True))
            c_in = c_out
        return blocks

    def _build(self):
        E, c = self.config["emb_dim"], self.config["channels"]
        for name, blocks in self.stages.items():
            ci = blocks[0][0]
            self.add_linear(f"{name}.time.0", E, ci)
            self.add_linear(f"{name}.time.2", ci, ci)
            for j, (b_in, b_out, _) in enumerate(blocks):
                self.add_param(f"{name}.blocks.{j}.norm.weight", np.ones(b_in))   # PyTorch's GroupNorm init
                self.add_param(f"{name}.blocks.{j}.norm.bias", np.zeros(b_in))
                self.add_conv(f"{name}.blocks.{j}.conv1", b_in, b_out, 3)
                self.add_conv(f"{name}.blocks.{j}.conv2", b_out, b_out, 3)
        for k, ck in enumerate(c):
            odd = self.sizes[k] % 2 == 1
            for kind, transpose in (("down", False), ("up", True)):
                # kernel sizes in the order applied: down [2,] 4; up 4[, 2] (see _resample)
                kernels = ([4, 2] if transpose else [2, 4]) if odd else [4]
                for i, kernel in enumerate(kernels):
                    self.add_conv(f"{kind}.{k}.{2 * i}", ck, ck, kernel, transpose)
        self.add_conv("out", c[0], self.config["in_channels"], 3)

    # -- forward -----------------------------------------------------------------------------
    def _inputs(self, x, t):
        """Checked x (in the model's dtype), t on the host (float64), the time embedding (B, E)."""
        F, c = self.ops, self.config
        s = c["image_size"]
        x = F.xp.asarray(x)
        self.check_input(x, (c["in_channels"], s, s), t)
        t_host = np.asarray(F.to_numpy(t), dtype=np.float64)
        check_finite_times(t_host, f"model {self.name!r}")
        emb = F.time_embedding(t_host * c["time_scale"], c["emb_dim"], dtype=self.dtype)
        return x.astype(self.dtype, copy=False), t_host, emb

    def forward(self, x, t):
        """x (B, C, H, W), t (B,) -> eps_theta (B, C, H, W)."""
        F, c = self.ops, self.config
        x, t_host, emb = self._inputs(x, t)
        tape, skips, h = [], [], x
        for k in range(len(c["channels"])):
            h = self._stage(f"enc.{k}", h, emb, tape)
            skips.append(h)
            tape.append(("skip", k, None))
            h = self._resample(f"down.{k}", h, self.sizes[k] % 2 == 1, False, tape)
        h = self._stage("mid", h, emb, tape)
        for k in reversed(range(len(c["channels"]))):
            h = self._resample(f"up.{k}", h, self.sizes[k] % 2 == 1, True, tape)
            h, cache = F.concat_forward([skips[k], h], axis=1)
            tape.append(("concat", k, cache))
            h = self._stage(f"dec.{k}", h, emb, tape)
        y = self._conv("out", h, 1, 1, False, tape)
        self._skip = None
        if c["input_skip"]:
            self._skip = self.skip_coefficient(t_host)
            y = y + self._skip * x
        self._tape, self._out_shape = tape, tuple(y.shape)
        return y

    def predict(self, x, t):
        """The inference forward: forward's eps_theta (B, C, H, W), keeping nothing for a
        backward (no tape: every activation is freed once the next op has read it). Each
        block runs as two fused ops (refdiff.nn.fused): the time vector's add, GroupNorm,
        conv1, its bias and SiLU as group_norm_conv2d; conv2, its bias and SiLU as
        conv2d_silu. The samplers call this; it equals forward within float32 rounding
        (tests/test_fused_ops.py)."""
        F, c = self.ops, self.config
        x, t_host, emb = self._inputs(x, t)
        fused, skips, h = fused_ops(F), [], x
        for k in range(len(c["channels"])):
            h = self._stage_predict(f"enc.{k}", h, emb, fused)
            skips.append(h)
            h = self._resample(f"down.{k}", h, self.sizes[k] % 2 == 1, False, [])
        h = self._stage_predict("mid", h, emb, fused)
        for k in reversed(range(len(c["channels"]))):
            h = self._resample(f"up.{k}", h, self.sizes[k] % 2 == 1, True, [])
            h, _ = F.concat_forward([skips[k], h], axis=1)
            skips[k] = None
            h = self._stage_predict(f"dec.{k}", h, emb, fused)
        y = self._conv("out", h, 1, 1, False, [])
        if c["input_skip"]:
            y = y + self.skip_coefficient(t_host) * x
        return y

    def _stage_predict(self, name, h, emb, fused):
        """_stage without a tape, each block as two fused ops."""
        F, p = self.ops, self.params
        a, _ = F.linear_forward(emb, p[f"{name}.time.0.weight"], p[f"{name}.time.0.bias"])
        a, _ = F.silu_forward(a)
        v, _ = F.linear_forward(a, p[f"{name}.time.2.weight"], p[f"{name}.time.2.bias"])
        for j, (c_in, _, use_norm) in enumerate(self.stages[name]):
            prefix = f"{name}.blocks.{j}"
            w1, b1 = p[prefix + ".conv1.weight"], p[prefix + ".conv1.bias"]
            shift = v if j == 0 else None                              # the stage's time vector, once
            if use_norm:
                g = num_groups(c_in, self.config["max_groups"])
                h, _ = fused.group_norm_conv2d_forward(h, g, p[prefix + ".norm.weight"], p[prefix + ".norm.bias"],
                                                       w1, b1, shift, 1, 1, silu_out=True)
            else:
                if shift is not None:
                    h, _ = F.add_channel_bias_forward(h, shift)
                h, _ = fused.conv2d_silu_forward(h, w1, b1, 1, 1)
            h, _ = fused.conv2d_silu_forward(h, p[prefix + ".conv2.weight"], p[prefix + ".conv2.bias"], 1, 1)
        return h

    def skip_coefficient(self, t_host):
        """input_skip: c(t) = std_t of VP(0.1, 20) (the report's chain in the continuous limit),
        (B, 1, 1, 1) on the backend. eps_theta = c(t) x + network: c(t) x is E[eps | x_t] for
        unit-variance Gaussian data, and carries x_t's mean and scale, which every GroupNorm of
        this residual-free network removes (EDM's c_skip, Karras et al. 2022, in eps form)."""
        from ..sde import VP
        # VP's marginal std, sqrt(1 - e^{2 log_gamma}), without its t in [0, T] check: the
        # network accepts any t (its time_scale decides what t means), and so does the skip
        c = np.sqrt(-np.expm1(2 * VP(0.1, 20.0).log_gamma(t_host)))
        return self.ops.asarray(c.astype(self.dtype).reshape(-1, 1, 1, 1))

    def _stage(self, name, h, emb, tape):
        F, p = self.ops, self.params
        a, lin0 = F.linear_forward(emb, p[f"{name}.time.0.weight"], p[f"{name}.time.0.bias"])
        a, act = F.silu_forward(a)
        v, lin2 = F.linear_forward(a, p[f"{name}.time.2.weight"], p[f"{name}.time.2.bias"])
        h, add = F.add_channel_bias_forward(h, v)                  # same v at every pixel
        tape.append(("time", f"{name}.time", (lin0, act, lin2, add)))
        for j, (c_in, _, use_norm) in enumerate(self.stages[name]):
            prefix = f"{name}.blocks.{j}"
            if use_norm:
                g = num_groups(c_in, self.config["max_groups"])
                h, cache = F.group_norm_forward(h, g, p[prefix + ".norm.weight"], p[prefix + ".norm.bias"])
                tape.append(("group_norm", prefix + ".norm", cache))
            h = self._silu(self._conv(prefix + ".conv1", h, 1, 1, False, tape), tape)
            h = self._silu(self._conv(prefix + ".conv2", h, 1, 1, False, tape), tape)
        return h

    def _resample(self, name, h, odd, transpose, tape):
        """down: [Conv(2,1) -> SiLU ->] Conv(4,2,1);  up: ConvT(4,2,1) [-> SiLU -> ConvT(2,1)]."""
        halve, shrink = (2, 1), (1, 0)            # (stride, padding) of the 4x4 and the 2x2 conv
        if not odd:
            return self._conv(name + ".0", h, *halve, transpose, tape)
        first, second = (halve, shrink) if transpose else (shrink, halve)
        h = self._silu(self._conv(name + ".0", h, *first, transpose, tape), tape)
        return self._conv(name + ".2", h, *second, transpose, tape)

    def _conv(self, name, h, stride, padding, transpose, tape):
        op = "conv_transpose2d" if transpose else "conv2d"
        fwd = getattr(self.ops, op + "_forward")
        h, cache = fwd(h, self.params[name + ".weight"], self.params[name + ".bias"], stride, padding)
        tape.append((op, name, cache))
        return h

    def _silu(self, h, tape):
        h, cache = self.ops.silu_forward(h)
        tape.append(("silu", None, cache))
        return h

    # -- backward ----------------------------------------------------------------------------
    def backward(self, dy):
        """dy (B, C, H, W) -> dx (B, C, H, W); parameter gradients accumulate into self.grads."""
        if self._tape is None:
            raise RuntimeError("backward called before forward")
        F, acc = self.ops, self.accumulate
        dy = F.xp.asarray(dy)
        if tuple(dy.shape) != self._out_shape:
            raise ValueError(f"model {self.name!r}: dy must have the output's shape {self._out_shape}; "
                             f"got {tuple(dy.shape)}")
        dy = dy.astype(self.dtype, copy=False)
        dy_out, d_skips = dy, {}
        for op, name, cache in reversed(self._tape):
            if op == "skip":                          # the encoder output also fed dec.k
                dy = dy + d_skips.pop(name)
            elif op == "concat":
                d_skips[name], dy = F.concat_backward(dy, cache)
            elif op == "time":
                dy = self._time_backward(name, dy, cache)
            elif op == "silu":
                dy = F.silu_backward(dy, cache)
            else:                                     # conv2d, conv_transpose2d, group_norm
                dy, dw, db = getattr(F, op + "_backward")(dy, cache)
                acc(name + ".weight", dw)
                acc(name + ".bias", db)
        if self._skip is not None:
            dy = dy + self._skip * dy_out
        self._tape = None
        return dy

    def _time_backward(self, name, dh, caches):
        F, acc = self.ops, self.accumulate
        lin0, act, lin2, add = caches
        dh, dv = F.add_channel_bias_backward(dh, add)
        da, dw, db = F.linear_backward(dv, lin2)
        acc(name + ".2.weight", dw), acc(name + ".2.bias", db)
        _, dw, db = F.linear_backward(F.silu_backward(da, act), lin0)   # d emb is not needed
        acc(name + ".0.weight", dw), acc(name + ".0.bias", db)
        return dh

    def __call__(self, x, t):
        return self.forward(x, t)


# The report's network (appendix, fig. 4.1; table 3.1; layers in docs/report.md): 1,335,486 parameters.
SEED_CONFIG = dict(in_channels=1, image_size=28, channels=[10, 20, 40, 80], blocks=3, mid_channels=40,
                   emb_dim=100, time_scale=1000.0, max_groups=8, final_norm=False)

# The report's network without the GroupNorm of the raw input (see the module docstring).
SEED_FIXED_CONFIG = dict(SEED_CONFIG, input_norm=False)

# A smaller network of the same structure for tests and quick runs on 28 x 28 (without the
# input GroupNorm: it is not the report's network, so it does not copy that flaw).
SMALL_CONFIG = dict(in_channels=1, image_size=28, channels=[8, 16, 32], blocks=2, mid_channels=16,
                    emb_dim=32, time_scale=1000.0, max_groups=8, final_norm=False, input_norm=False)


def unet_seed(dtype=np.float32, seed=0, backend=None, **overrides):
    """The report's UNet; `overrides` change any key of SEED_CONFIG."""
    return UNet(dtype=dtype, seed=seed, backend=backend, **{**SEED_CONFIG, **overrides})


def unet_seed_fixed(dtype=np.float32, seed=0, backend=None, **overrides):
    """The report's UNet with one change: no GroupNorm on the raw input (SEED_FIXED_CONFIG)."""
    return UNet(dtype=dtype, seed=seed, backend=backend, **{**SEED_FIXED_CONFIG, **overrides})


# ... plus the output skip c(t) x (see UNet.skip_coefficient).
SEED_SKIP_CONFIG = dict(SEED_FIXED_CONFIG, input_skip=True)


def unet_seed_skip(dtype=np.float32, seed=0, backend=None, **overrides):
    """unet-seed-fixed plus the output skip eps_theta = c(t) x + network (SEED_SKIP_CONFIG)."""
    return UNet(dtype=dtype, seed=seed, backend=backend, **{**SEED_SKIP_CONFIG, **overrides})


def unet_small(dtype=np.float32, seed=0, backend=None, **overrides):
    """A small UNet of the same structure (SMALL_CONFIG, changed by `overrides`)."""
    return UNet(dtype=dtype, seed=seed, backend=backend, **{**SMALL_CONFIG, **overrides})
