"""The diffusion UNet the field uses (Ho, Jain & Abbeel 2020, appendix B; their
`diffusion_tf` code), for 28 x 28 images, with class conditioning for classifier-free
guidance (Ho & Salimans 2022) (reference).

With c = channels (c_0..c_{L-1}), n = blocks per level, E = emb_mult * c_0:

    temb   = Linear(E,E)(SiLU(Linear(c_0,E)(sinusoid(t * time_scale, c_0))))
             [+ W_y onehot(y)]  (class-conditional: a label embedding, no bias; y = K is the
                                 null label, "no class", used for the unconditional half of
                                 classifier-free guidance and for label dropout)
    in     : Conv3x3(in_channels, c_0)                                     -> skip
    down.l : n x [ResBlock(-> c_l) (+ Attn if l in attention)]             -> skip after each
             Conv3x3 stride 2 (l < L-1; keeps c_l)                         -> skip
    mid    : ResBlock(c_{L-1}), Attn, ResBlock(c_{L-1})
    up.l   : (n+1) x [concat(h, skip.pop()) -> ResBlock(-> c_l) (+ Attn)]  (l = L-1 .. 0)
             nearest 2x -> Conv3x3 (l > 0)
    out    : GroupNorm -> SiLU -> Conv3x3(c_0, in_channels)

    ResBlock(x; ci -> co) = skip(x) + Conv3x3(Dropout(SiLU(GN(Conv3x3(SiLU(GN(x))) + Linear(SiLU(temb))))))
             skip = identity when ci = co, else Conv1x1(ci, co)
    Attn(x; c)           = x + Conv1x1(spatial_attention(Conv1x1(c, 3c)(GN(x)), heads))

The attention op (refdiff.nn.attention) is softmax(q^T k / sqrt(d)) v over the H W positions,
per head. As in Ho et al.'s code, the last conv of every ResBlock, the attention's output
projection and the output conv start at zero (`zero_init`), so each block starts as the
identity and the network as 0. GroupNorm groups: the largest divisor of the channels that is
<= max_groups (8: groups of 4 or 8 channels at 32 and 64).

What the output means is the run's prediction target (eps, x0 or v: refdiff.prediction);
`kind` is "eps" because the samplers see every target through that conversion.

forward(x, t, y=None, rng=None): y (B,) int labels in [0, K] for a class-conditional model
(None: the null label K for all), rng a numpy Generator switches dropout on (training);
rng=None (sampling, evaluation) is the deterministic network; predict(x, t, y) computes it
without keeping anything for a backward, each ResBlock as two fused ops (refdiff.nn.fused),
and is what the samplers call. forward_jvp / backward_jvp
(exact sliced score matching) come from running this same forward and backward on Duals
(refdiff.nn.unet_jvp.UNetJVP); the time and label paths carry no tangent.

Default (channels 32, 64, 64; one block per level; attention at 7 x 7; one head; dropout 0.1):
the size of the PyTorch UNet the README compares against. Checked while written against an
independent PyTorch build of the same network (benchmarks/torch_unet.py).
"""
from __future__ import annotations

import numpy as np

from .._checks import check_finite_times, check_int, check_real
from .base import Model
from .fused import fused_ops
from .unet import num_groups
from .unet_jvp import UNetJVP


class UNetDDPM(UNetJVP, Model):
    kind = "eps"
    uses_dropout = True
    # what forward_jvp / backward_jvp save and restore around the tangent pass (UNetJVP)
    _STATE = ("_tape", "_out_shape", "_skip", "_emb_caches", "_temb_act")

    def __init__(self, in_channels=1, image_size=28, channels=(32, 64, 64), blocks=1, attention=(2,), heads=1,
                 dropout=0.1, num_classes=0, emb_mult=4, max_groups=8, time_scale=1000.0, zero_init=True,
                 dtype=np.float32, seed=0, backend=None):
        channels = [check_int(c, "channels entries", lo=1) for c in channels]
        attention = sorted({check_int(a, "attention entries") for a in attention})
        cfg = dict(in_channels=check_int(in_channels, "in_channels", lo=1),
                   image_size=check_int(image_size, "image_size", lo=1), channels=channels,
                   blocks=check_int(blocks, "blocks", lo=1), attention=attention,
                   heads=check_int(heads, "heads", lo=1),
                   dropout=check_real(dropout, "dropout", lo=0.0, hi=1.0, hi_open=True),
                   num_classes=check_int(num_classes, "num_classes", lo=0),
                   emb_mult=check_int(emb_mult, "emb_mult", lo=1), max_groups=check_int(max_groups, "max_groups", lo=1),
                   time_scale=check_real(time_scale, "time_scale", lo=0.0, lo_open=True), zero_init=bool(zero_init))
        self._check_config(cfg)
        super().__init__("unet-ddpm", cfg, dtype, seed, backend)
        self.sizes = [cfg["image_size"] // 2 ** k for k in range(len(channels))]
        self._build()
        self._tape, self._out_shape, self._skip = None, None, None

    @staticmethod
    def _check_config(c):
        problems, levels = [], len(c["channels"])
        if not c["channels"]:
            problems.append("channels must be a non-empty list of positive ints")
        bad = [a for a in c["attention"] if not 0 <= a < levels]
        if bad:
            problems.append(f"attention at level(s) {bad}: the network has levels 0..{levels - 1} "
                            f"(one per entry of channels {c['channels']})")
        if c["image_size"] % 2 ** (levels - 1):
            problems.append(f"image_size {c['image_size']} must be divisible by 2^{levels - 1} = {2 ** (levels - 1)} "
                            f"(halved once per level after the first)")
        for a in c["attention"]:
            if 0 <= a < levels and c["channels"][a] % c["heads"]:
                problems.append(f"heads={c['heads']} must divide the {c['channels'][a]} channels of attention level {a}")
        if c["channels"] and c["channels"][-1] % c["heads"]:
            problems.append(f"heads={c['heads']} must divide the {c['channels'][-1]} channels of the middle "
                            f"attention block (channels[-1]), which every unet-ddpm has")
        if problems:
            raise ValueError("unet-ddpm: " + "; ".join(problems))

    # -- parameters ----------------------------------------------------------------------
    @property
    def emb_dim(self):
        return self.config["emb_mult"] * self.config["channels"][0]

    def _zero_or_conv(self, name, c_in, c_out, k):
        self.add_conv(name, c_in, c_out, k)
        if self.config["zero_init"]:
            self.params[name + ".weight"][...] = 0
            self.params[name + ".bias"][...] = 0

    def _add_norm(self, name, c):
        self.add_param(name + ".weight", np.ones(c))
        self.add_param(name + ".bias", np.zeros(c))

    def _add_res(self, name, ci, co):
        self._add_norm(name + ".norm1", ci)
        self.add_conv(name + ".conv1", ci, co, 3)
        self.add_linear(name + ".temb", self.emb_dim, co)
        self._add_norm(name + ".norm2", co)
        self._zero_or_conv(name + ".conv2", co, co, 3)
        if ci != co:
            self.add_conv(name + ".skip", ci, co, 1)

    def _add_attn(self, name, c):
        self._add_norm(name + ".norm", c)
        self.add_conv(name + ".qkv", c, 3 * c, 1)
        self._zero_or_conv(name + ".proj", c, c, 1)

    def _build(self):
        """Parameters in forward order; self.layout: the (kind, name, ci, co, level) plan."""
        c, n, E, attn = self.config["channels"], self.config["blocks"], self.emb_dim, self.config["attention"]
        self.add_linear("temb.0", c[0], E)
        self.add_linear("temb.2", E, E)
        if self.config["num_classes"]:
            self.add_linear("label", self.config["num_classes"] + 1, E, bias=False)
        self.add_conv("in", self.config["in_channels"], c[0], 3)
        layout, skips, h = [], [c[0]], c[0]
        for lv, cl in enumerate(c):
            for b in range(n):
                layout.append(("res", f"down.{lv}.res.{b}", h, cl, lv))
                if lv in attn:
                    layout.append(("attn", f"down.{lv}.attn.{b}", cl, cl, lv))
                layout.append(("push", None, cl, cl, lv))
                h = cl
                skips.append(h)
            if lv < len(c) - 1:
                layout.append(("down", f"down.{lv}.down", h, h, lv))
                layout.append(("push", None, h, h, lv))
                skips.append(h)
        layout += [("res", "mid.res.0", h, h, None), ("attn", "mid.attn", h, h, None), ("res", "mid.res.1", h, h, None)]
        for lv in reversed(range(len(c))):
            for b in range(n + 1):
                layout.append(("concat", None, h, h + skips[-1], lv))
                ci = h + skips.pop()
                layout.append(("res", f"up.{lv}.res.{b}", ci, c[lv], lv))
                h = c[lv]
                if lv in attn:
                    layout.append(("attn", f"up.{lv}.attn.{b}", h, h, lv))
            if lv > 0:
                layout.append(("up", f"up.{lv}.up", h, h, lv))
        for kind, name, ci, co, _ in layout:
            if kind == "res":
                self._add_res(name, ci, co)
            elif kind == "attn":
                self._add_attn(name, ci)
            elif kind in ("down", "up"):
                self.add_conv(name, ci, co, 3)
        self._add_norm("out.norm", c[0])
        self._zero_or_conv("out.conv", c[0], self.config["in_channels"], 3)
        self.layout = layout

    # -- forward -----------------------------------------------------------------------------
    def _labels(self, y, B):
        """One-hot (B, K + 1) host array of the labels (None: the null label K), or None when unconditional."""
        K = self.config["num_classes"]
        if K == 0:
            if y is not None:
                raise ValueError(f"model {self.name!r} is unconditional (num_classes 0): labels y must be None")
            return None
        y = np.full(B, K, dtype=np.int64) if y is None else np.asarray(self.ops.to_numpy(y))
        if y.shape != (B,) or not np.issubdtype(y.dtype, np.integer):      # bool and float refused
            raise ValueError(f"model {self.name!r}: labels y must be integers of shape ({B},); got "
                             f"{y.dtype} {tuple(y.shape)}")
        if y.size and (y.min() < 0 or y.max() > K):
            raise ValueError(f"model {self.name!r}: labels y must lie in [0, {K}] ({K} = no class); "
                             f"got values in [{y.min()}, {y.max()}]")
        onehot = np.zeros((B, K + 1), dtype=self.dtype)
        onehot[np.arange(B), y.astype(np.int64)] = 1
        return onehot

    def _inputs(self, x, t, y):
        """Checked x (in the model's dtype) and SiLU(temb) (B, E) with the caches of its ops."""
        F, c, p = self.ops, self.config, self.params
        s = c["image_size"]
        x = F.xp.asarray(x)
        self.check_input(x, (c["in_channels"], s, s), t)
        t_host = np.asarray(F.to_numpy(t), dtype=np.float64)
        check_finite_times(t_host, f"model {self.name!r}")
        onehot = self._labels(y, x.shape[0])
        x = x.astype(self.dtype, copy=False)
        # time (and label) embedding: no tangent, host-independent of x
        e = F.time_embedding(t_host * c["time_scale"], c["channels"][0], dtype=self.dtype)
        a, lin0 = F.linear_forward(e, p["temb.0.weight"], p["temb.0.bias"])
        a, act0 = F.silu_forward(a)
        temb, lin2 = F.linear_forward(a, p["temb.2.weight"], p["temb.2.bias"])
        lab = None
        if onehot is not None:
            ey, lab = F.linear_forward(F.asarray(onehot), p["label.weight"], None)
            temb = temb + ey
        temb_act, act1 = F.silu_forward(temb)
        return x, temb_act, (lin0, act0, lin2, lab, act1)

    def forward(self, x, t, y=None, rng=None):
        """x (B, C, H, W), t (B,), y (B,) labels or None, rng (dropout) or None -> (B, C, H, W)."""
        F, c = self.ops, self.config
        if rng is not None and not isinstance(rng, np.random.Generator):
            raise TypeError(f"model {self.name!r}: rng (dropout) must be a numpy.random.Generator or None; "
                            f"got {type(rng).__name__}")
        x, temb_act, self._emb_caches = self._inputs(x, t, y)
        self._temb_act, self._d_temb_act = temb_act, None
        h, cache = self._conv("in", x, 1, 1)
        tape, skips = [("conv", "in", cache), ("push", 0, None)], [h]
        drop = rng if c["dropout"] > 0 else None
        for kind, name, ci, co, _ in self.layout:
            if kind == "res":
                h, cache = self._res_forward(name, h, ci, co, drop)
            elif kind == "attn":
                h, cache = self._attn_forward(name, h, ci)
            elif kind == "down":
                h, cache = self._conv(name, h, 2, 1)
            elif kind == "up":
                h, up = F.upsample_nearest2x_forward(h)
                h, conv = self._conv(name, h, 1, 1)
                cache = (up, conv)
            elif kind == "push":
                skips.append(h)
                tape.append(("push", len(skips) - 1, None))
                continue
            else:                                                   # concat with the last skip
                k = len(skips) - 1
                h, cache = F.concat_forward([h, skips.pop()], axis=1)
                tape.append(("concat", k, cache))
                continue
            tape.append((kind, name, cache))
        h, norm = self._norm_silu("out.norm", h, c["channels"][0])
        tape.append(("norm_silu", "out.norm", norm))
        h, conv = self._conv("out.conv", h, 1, 1)
        tape.append(("conv", "out.conv", conv))
        self._tape, self._out_shape = tape, tuple(h.shape)
        return h

    def predict(self, x, t, y=None):
        """The inference forward: forward(x, t, y) with dropout off (rng None), keeping nothing
        for a backward (no tape, no caches on the model). Each ResBlock runs as two fused ops
        (refdiff.nn.fused.group_norm_conv2d): GroupNorm, SiLU and conv1; the time vector's add,
        GroupNorm, SiLU and conv2; so does the output's GroupNorm, SiLU and conv. The samplers
        call this; it equals forward within float32 rounding (tests/test_fused_ops.py)."""
        F, c = self.ops, self.config
        x, temb_act, _ = self._inputs(x, t, y)
        fused = fused_ops(F)
        h, _ = self._conv("in", x, 1, 1)
        skips = [h]
        for kind, name, ci, co, _ in self.layout:
            if kind == "res":
                h = self._res_predict(name, h, ci, co, temb_act, fused)
            elif kind == "attn":
                h, _ = self._attn_forward(name, h, ci)
            elif kind == "down":
                h, _ = self._conv(name, h, 2, 1)
            elif kind == "up":
                h, _ = F.upsample_nearest2x_forward(h)
                h, _ = self._conv(name, h, 1, 1)
            elif kind == "push":
                skips.append(h)
            else:                                                   # concat with the last skip
                h, _ = F.concat_forward([h, skips.pop()], axis=1)
        h, _ = self._norm_conv(fused, "out.norm", "out.conv", h, c["channels"][0])
        return h

    def _norm_conv(self, fused, norm, conv, x, ch, shift=None):
        """conv(SiLU(GroupNorm(x [+ shift]))) as one fused op (3x3, padding 1)."""
        p = self.params
        return fused.group_norm_conv2d_forward(x, num_groups(ch, self.config["max_groups"]), p[norm + ".weight"],
                                               p[norm + ".bias"], p[conv + ".weight"], p[conv + ".bias"], shift,
                                               1, 1, silu_in=True)

    def _res_predict(self, name, x, ci, co, temb_act, fused):
        """_res_forward without caches and dropout, as two fused ops."""
        p = self.params
        h, _ = self._norm_conv(fused, name + ".norm1", name + ".conv1", x, ci)
        v, _ = self.ops.linear_forward(temb_act, p[name + ".temb.weight"], p[name + ".temb.bias"])
        h, _ = self._norm_conv(fused, name + ".norm2", name + ".conv2", h, co, shift=v)
        return h + (x if ci == co else self._conv(name + ".skip", x, 1, 0)[0])

    def _conv(self, name, h, stride, padding):
        return self.ops.conv2d_forward(h, self.params[name + ".weight"], self.params[name + ".bias"], stride, padding)

    def _res_forward(self, name, x, ci, co, rng):
        F, p, c = self.ops, self.params, self.config
        h, n1 = self._norm_silu(name + ".norm1", x, ci)
        h, c1 = self._conv(name + ".conv1", h, 1, 1)
        v, lin = F.linear_forward(self._temb_act, p[name + ".temb.weight"], p[name + ".temb.bias"])
        h, add = F.add_channel_bias_forward(h, v)
        h, n2 = self._norm_silu(name + ".norm2", h, co)
        drop = None
        if rng is not None:
            h, drop = F.dropout_forward(h, c["dropout"], rng)
        h, c2 = self._conv(name + ".conv2", h, 1, 1)
        sk = None
        if ci != co:
            skip, sk = self._conv(name + ".skip", x, 1, 0)
        else:
            skip = x
        return h + skip, (n1, c1, lin, add, n2, drop, c2, sk)

    def _norm_silu(self, name, x, ch):
        """SiLU(GroupNorm(x)) as two ops (the fused group_norm_silu pair computes the same; as
        two passes it runs faster on the numba backend, whose fused kernel evaluates tanh)."""
        F, p = self.ops, self.params
        h, norm = F.group_norm_forward(x, num_groups(ch, self.config["max_groups"]), p[name + ".weight"],
                                       p[name + ".bias"])
        h, act = F.silu_forward(h)
        return h, (norm, act)

    def _attn_forward(self, name, x, ch):
        F, p = self.ops, self.params
        h, norm = F.group_norm_forward(x, num_groups(ch, self.config["max_groups"]), p[name + ".norm.weight"],
                                       p[name + ".norm.bias"])
        h, qkv = self._conv(name + ".qkv", h, 1, 0)
        h, att = F.spatial_attention_forward(h, self.config["heads"])
        h, proj = self._conv(name + ".proj", h, 1, 0)
        return x + h, (norm, qkv, att, proj)

    # -- backward ----------------------------------------------------------------------------
    def backward(self, dy):
        """dy (B, C, H, W) -> dx (B, C, H, W); parameter gradients accumulate into self.grads."""
        if self._tape is None:
            raise RuntimeError("backward called before forward")
        F = self.ops
        dy = F.xp.asarray(dy)
        if tuple(dy.shape) != self._out_shape:
            raise ValueError(f"model {self.name!r}: dy must have the output's shape {self._out_shape}; "
                             f"got {tuple(dy.shape)}")
        dh, d_skips = dy.astype(self.dtype, copy=False), {}
        for kind, name, cache in reversed(self._tape):
            if kind == "push":                      # this activation also fed a concat
                dh = dh + d_skips.pop(name)
            elif kind == "concat":
                dh, d_skips[name] = F.concat_backward(dh, cache)
            elif kind in ("conv", "down"):             # a plain conv, or the stride-2 one
                dh = self._conv_backward(name, dh, cache)
            elif kind == "norm_silu":
                dh = self._norm_silu_backward(name, dh, cache)
            elif kind == "res":
                dh = self._res_backward(name, dh, cache)
            elif kind == "attn":
                dh = self._attn_backward(name, dh, cache)
            else:                                   # up
                up, conv = cache
                dh = F.upsample_nearest2x_backward(self._conv_backward(name, dh, conv), up)
        self._emb_backward()
        self._tape = None
        return dh

    def _conv_backward(self, name, dh, cache):
        dx, dw, db = self.ops.conv2d_backward(dh, cache)
        self.accumulate(name + ".weight", dw)
        self.accumulate(name + ".bias", db)
        return dx

    def _norm_backward(self, name, dh, cache, backward):
        dx, dw, db = backward(dh, cache)
        self.accumulate(name + ".weight", dw)
        self.accumulate(name + ".bias", db)
        return dx

    def _norm_silu_backward(self, name, dh, cache):
        norm, act = cache
        return self._norm_backward(name, self.ops.silu_backward(dh, act), norm, self.ops.group_norm_backward)

    def _res_backward(self, name, dy, cache):
        F = self.ops
        n1, c1, lin, add, n2, drop, c2, sk = cache
        dh = self._conv_backward(name + ".conv2", dy, c2)
        if drop is not None:
            dh = F.dropout_backward(dh, drop)
        dh = self._norm_silu_backward(name + ".norm2", dh, n2)
        dh, dv = F.add_channel_bias_backward(dh, add)
        da, dw, db = F.linear_backward(dv, lin)          # the time path (no tangent: dv is plain)
        self.accumulate(name + ".temb.weight", dw)
        self.accumulate(name + ".temb.bias", db)
        self._d_temb_act = da if self._d_temb_act is None else self._d_temb_act + da
        dh = self._conv_backward(name + ".conv1", dh, c1)
        dx = self._norm_silu_backward(name + ".norm1", dh, n1)
        return dx + (dy if sk is None else self._conv_backward(name + ".skip", dy, sk))

    def _attn_backward(self, name, dy, cache):
        F = self.ops
        norm, qkv, att, proj = cache
        dh = self._conv_backward(name + ".proj", dy, proj)
        dh = F.spatial_attention_backward(dh, att)
        dh = self._conv_backward(name + ".qkv", dh, qkv)
        return dy + self._norm_backward(name + ".norm", dh, norm, F.group_norm_backward)

    def _emb_backward(self):
        """Gradients of the time MLP (and label embedding) from the blocks' d SiLU(temb)."""
        F, acc = self.ops, self.accumulate
        d = self._d_temb_act
        self._d_temb_act = None
        if d is None:
            return
        lin0, act0, lin2, lab, act1 = self._emb_caches
        dt = F.silu_backward(d, act1)
        if lab is not None:
            _, dw, _ = F.linear_backward(dt, lab)
            acc("label.weight", dw)
        da, dw, db = F.linear_backward(dt, lin2)
        acc("temb.2.weight", dw), acc("temb.2.bias", db)
        _, dw, db = F.linear_backward(F.silu_backward(da, act0), lin0)
        acc("temb.0.weight", dw), acc("temb.0.bias", db)

    def __call__(self, x, t, y=None, rng=None):
        return self.forward(x, t, y, rng)


def unet_ddpm(dtype=np.float32, seed=0, backend=None, **overrides):
    """Ho et al.'s DDPM UNet for 28 x 28 (channels 32, 64, 64; attention at 7 x 7); `overrides`
    change any constructor argument of UNetDDPM."""
    return UNetDDPM(dtype=dtype, seed=seed, backend=backend, **overrides)
