"""The refdiff UNet (refdiff/nn/unet.py) rebuilt in PyTorch, for the speed comparison only.

`plan_of(model)` turns a refdiff UNet into plain data (config, stages, sizes, GroupNorm
groups); `TorchUNet(plan, state)` builds the same network from that plan and loads the
same weights by name. The split keeps refdiff out of the PyTorch worker's process: the
parent calls `plan_of` and saves the weights, the worker imports only torch, numpy and
this file. The parent checks the worker's output against refdiff's before anything is
timed. refdiff itself never imports torch.
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
