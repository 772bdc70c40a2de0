"""refdiff's UNets rebuilt in PyTorch, for the speed comparison only (benchmarks/train_step.py).

    unet-seed   (refdiff/nn/unet.py)       plan_of(model)       -> TorchUNet(plan, state)
    unet-ddpm   (refdiff/nn/unet_ddpm.py)  plan_of_ddpm(model)  -> TorchUNetDDPM(plan, state)

`plan_of*` turns a refdiff model into plain data (config, stages or layout, GroupNorm
groups); the torch class builds the same network from that plan and loads the same weights
by parameter name (every one: strict). The split keeps refdiff out of the PyTorch worker's
process: the parent calls `plan_of*` and saves the weights, the worker imports only torch,
numpy and this file. The worker's output is checked against refdiff's before anything is
timed (unet-ddpm: output, input gradient and every parameter gradient in float64,
train_step.check64). refdiff itself never imports torch.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as tF


def plan_of(ref):
    """What TorchUNet needs from a refdiff UNet `ref`, as picklable plain data."""
    from refdiff.nn.unet import num_groups
    c = dict(ref.config)
    stages = {name: [tuple(b) for b in blocks] for name, blocks in ref.stages.items()}
    groups = {f"{name}.blocks.{j}.norm": num_groups(bi, c["max_groups"])
              for name, blocks in stages.items() for j, (bi, _, _) in enumerate(blocks)}
    return dict(config=c, stages=stages, sizes=list(ref.sizes), groups=groups)


class _Mods(nn.ModuleDict):
    """A ModuleDict keyed by refdiff's dotted prefixes ('.' is stored as '__')."""

    def __getitem__(self, k):
        return super().__getitem__(k.replace(".", "__"))

    def __setitem__(self, k, v):
        super().__setitem__(k.replace(".", "__"), v)


class TorchUNet(nn.Module):
    def __init__(self, plan, state):
        """plan: `plan_of(model)`; state: {refdiff parameter name: array}, as `model.state()`."""
        super().__init__()
        c = plan["config"]
        if c.get("input_skip"):
            raise ValueError("TorchUNet has no input skip c(t) x: benchmark a model without input_skip")
        self.cfg, self.plan, self.sizes = c, plan["stages"], plan["sizes"]
        self.mods = m = _Mods()
        for name, blocks in self.plan.items():
            ci = blocks[0][0]
            m[f"{name}.time.0"] = nn.Linear(c["emb_dim"], ci)
            m[f"{name}.time.2"] = nn.Linear(ci, ci)
            for j, (bi, bo, _) in enumerate(blocks):
                m[f"{name}.blocks.{j}.norm"] = nn.GroupNorm(plan["groups"][f"{name}.blocks.{j}.norm"], bi)
                m[f"{name}.blocks.{j}.conv1"] = nn.Conv2d(bi, bo, 3, padding=1)
                m[f"{name}.blocks.{j}.conv2"] = nn.Conv2d(bo, bo, 3, padding=1)
        for k, ck in enumerate(c["channels"]):
            if self.sizes[k] % 2:
                m[f"down.{k}.0"], m[f"down.{k}.2"] = nn.Conv2d(ck, ck, 2, 1, 0), nn.Conv2d(ck, ck, 4, 2, 1)
                m[f"up.{k}.0"], m[f"up.{k}.2"] = nn.ConvTranspose2d(ck, ck, 4, 2, 1), nn.ConvTranspose2d(ck, ck, 2, 1, 0)
            else:
                m[f"down.{k}.0"], m[f"up.{k}.0"] = nn.Conv2d(ck, ck, 4, 2, 1), nn.ConvTranspose2d(ck, ck, 4, 2, 1)
        m["out"] = nn.Conv2d(c["channels"][0], c["in_channels"], 3, padding=1)
        sd = {}
        for k, v in state.items():
            mod, _, p = k.rpartition(".")
            sd["mods." + mod.replace(".", "__") + "." + p] = torch.from_numpy(np.array(v, dtype=np.float32))
        self.load_state_dict(sd)

    def _stage(self, name, h, emb):
        m = self.mods
        h = h + m[f"{name}.time.2"](tF.silu(m[f"{name}.time.0"](emb)))[:, :, None, None]
        for j, (_, _, use_norm) in enumerate(self.plan[name]):
            if use_norm:
                h = m[f"{name}.blocks.{j}.norm"](h)
            h = tF.silu(m[f"{name}.blocks.{j}.conv1"](h))
            h = tF.silu(m[f"{name}.blocks.{j}.conv2"](h))
        return h

    def forward(self, x, emb):
        """x (B, C, H, W), emb = refdiff's time_embedding(t * time_scale) (B, E)."""
        m, skips, h, L = self.mods, [], x, len(self.cfg["channels"])
        for k in range(L):
            h = self._stage(f"enc.{k}", h, emb)
            skips.append(h)
            h = m[f"down.{k}.2"](tF.silu(m[f"down.{k}.0"](h))) if self.sizes[k] % 2 else m[f"down.{k}.0"](h)
        h = self._stage("mid", h, emb)
        for k in reversed(range(L)):
            h = m[f"up.{k}.2"](tF.silu(m[f"up.{k}.0"](h))) if self.sizes[k] % 2 else m[f"up.{k}.0"](h)
            h = self._stage(f"dec.{k}", torch.cat([skips[k], h], 1), emb)
        return m["out"](h)


# --- unet-ddpm (refdiff/nn/unet_ddpm.py) ---------------------------------------------------------
def plan_of_ddpm(ref):
    """What TorchUNetDDPM needs from a refdiff UNetDDPM `ref`: its config, its layout (the
    (kind, name, ci, co, level) plan its forward walks) and every GroupNorm's groups."""
    from refdiff.nn.unet import num_groups
    c = dict(ref.config)
    groups = {k[:-len(".weight")]: num_groups(v.shape[0], c["max_groups"]) for k, v in ref.params.items()
              if k.endswith(".weight") and np.ndim(v) == 1}
    return dict(config=c, layout=[tuple(r) for r in ref.layout], groups=groups)


def attention(qkv, heads):
    """refdiff.nn.attention.spatial_attention_forward in torch: qkv (B, 3C, H, W) -> (B, C, H, W)."""
    B, C3, H, W = qkv.shape
    C = C3 // 3
    q, k, v = qkv.reshape(B, 3, heads, C // heads, H * W).transpose(-1, -2).unbind(1)   # (B, heads, N, d)
    y = tF.scaled_dot_product_attention(q, k, v)                                       # softmax(q k^T / sqrt(d)) v
    return y.transpose(-1, -2).reshape(B, C, H, W)


class TorchUNetDDPM(nn.Module):
    """unet-ddpm in PyTorch, parameters named as refdiff's; unconditional models only."""

    def __init__(self, plan, state):
        super().__init__()
        c = self.cfg = plan["config"]
        if c["num_classes"]:
            raise ValueError("TorchUNetDDPM: benchmark an unconditional unet-ddpm (num_classes 0)")
        self.layout, self.mods = plan["layout"], _Mods()
        m, E = self.mods, c["emb_mult"] * c["channels"][0]
        m["temb.0"], m["temb.2"] = nn.Linear(c["channels"][0], E), nn.Linear(E, E)
        m["in"] = nn.Conv2d(c["in_channels"], c["channels"][0], 3, padding=1)
        for kind, name, ci, co, _ in self.layout:
            if kind == "res":
                m[f"{name}.norm1"] = nn.GroupNorm(plan["groups"][f"{name}.norm1"], ci)
                m[f"{name}.conv1"] = nn.Conv2d(ci, co, 3, padding=1)
                m[f"{name}.temb"] = nn.Linear(E, co)
                m[f"{name}.norm2"] = nn.GroupNorm(plan["groups"][f"{name}.norm2"], co)
                m[f"{name}.conv2"] = nn.Conv2d(co, co, 3, padding=1)
                if ci != co:
                    m[f"{name}.skip"] = nn.Conv2d(ci, co, 1)
            elif kind == "attn":
                m[f"{name}.norm"] = nn.GroupNorm(plan["groups"][f"{name}.norm"], ci)
                m[f"{name}.qkv"], m[f"{name}.proj"] = nn.Conv2d(ci, 3 * ci, 1), nn.Conv2d(ci, ci, 1)
            elif kind == "down":
                m[name] = nn.Conv2d(ci, co, 3, stride=2, padding=1)
            elif kind == "up":
                m[name] = nn.Conv2d(ci, co, 3, padding=1)
        m["out.norm"] = nn.GroupNorm(plan["groups"]["out.norm"], c["channels"][0])
        m["out.conv"] = nn.Conv2d(c["channels"][0], c["in_channels"], 3, padding=1)
        self.drop = nn.Dropout(c["dropout"])
        self.load(state)

    def load(self, state, dtype=torch.float32):
        """{refdiff parameter name: array} -> the parameters (all of them: strict), in dtype."""
        sd = {}
        for k, v in state.items():
            mod, _, p = k.rpartition(".")
            sd["mods." + mod.replace(".", "__") + "." + p] = torch.from_numpy(np.array(v, dtype=np.float64))
        self.to(dtype)
        self.load_state_dict(sd)

    def _res(self, name, x, temb_act):
        m = self.mods
        h = m[f"{name}.conv1"](tF.silu(m[f"{name}.norm1"](x)))
        h = h + m[f"{name}.temb"](temb_act)[:, :, None, None]
        h = m[f"{name}.conv2"](self.drop(tF.silu(m[f"{name}.norm2"](h))))
        return h + (m[f"{name}.skip"](x) if f"{name}.skip".replace(".", "__") in m else x)

    def forward(self, x, emb):
        """x (B, C, H, W), emb = refdiff's time_embedding(t * time_scale, channels[0]) (B, c0).
        Dropout is on in train() mode (torch's own masks), off in eval()."""
        m = self.mods
        temb_act = tF.silu(m["temb.2"](tF.silu(m["temb.0"](emb))))
        h = m["in"](x)
        skips = [h]
        for kind, name, ci, _, _ in self.layout:
            if kind == "res":
                h = self._res(name, h, temb_act)
            elif kind == "attn":
                h = h + m[f"{name}.proj"](attention(m[f"{name}.qkv"](m[f"{name}.norm"](h)), self.cfg["heads"]))
            elif kind == "down":
                h = m[name](h)
            elif kind == "up":
                h = m[name](tF.interpolate(h, scale_factor=2, mode="nearest"))
            elif kind == "push":
                skips.append(h)
            else:                                          # concat with the last skip
                h = torch.cat([h, skips.pop()], 1)
        return m["out.conv"](tF.silu(m["out.norm"](h)))
