"""The refdiff UNet (refdiff/nn/unet.py) rebuilt in PyTorch, for the speed comparison only.

Built from a refdiff model's own plan (`stages`, `sizes`, config) and loaded with its
weights by name, then checked to give the same output before anything is timed.
refdiff itself never imports torch.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as tF

from refdiff.nn.unet import num_groups


class _Mods(nn.ModuleDict):
    """A ModuleDict keyed by refdiff's dotted prefixes ('.' is stored as '__')."""

    def __getitem__(self, k):
        return super().__getitem__(k.replace(".", "__"))

    def __setitem__(self, k, v):
        super().__setitem__(k.replace(".", "__"), v)


class TorchUNet(nn.Module):
    def __init__(self, ref):
        super().__init__()
        c = ref.config
        self.cfg, self.plan, self.sizes = c, ref.stages, ref.sizes
        self.mods = m = _Mods()
        for name, blocks in ref.stages.items():
            ci = blocks[0][0]
            m[f"{name}.time.0"] = nn.Linear(c["emb_dim"], ci)
            m[f"{name}.time.2"] = nn.Linear(ci, ci)
            for j, (bi, bo, _) in enumerate(blocks):
                m[f"{name}.blocks.{j}.norm"] = nn.GroupNorm(num_groups(bi, c["max_groups"]), bi)
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
        for k, v in ref.state().items():
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
