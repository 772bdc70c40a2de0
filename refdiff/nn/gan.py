"""Generative adversarial network of the report's comparison (§3.4.3), by hand; its layers
and training settings are those of the report's code.

    G   z (B, 64) ~ N(0, I) -> 128 -> 256 -> 512 (ReLU) -> 784, tanh -> image in [-1, 1]
    D   x (B, 784) -> 512 -> 256 -> 128 (LeakyReLU 0.2) -> 1 logit;  D(x) = sigmoid(logit)

Losses (Goodfellow et al. 2014, eq. 1 and the non-saturating variant of §3):

    L_D = BCE(D(x), 1) + BCE(D(G(z)), 0)     (means over the batch; G(z) held fixed)
    L_G = BCE(D(G(z)), 1) = -mean log D(G(z))  (non-saturating; gradients flow through D)

D's sigmoid is folded into `bce_with_logits` (the stable form). One Model holds both
networks, parameters prefixed "G." and "D."; each gets its own Adam(2e-4, (0.5, 0.999))
over its subset through refdiff.optim.ParamSubset (the losses: refdiff.objectives.GANObjective).
"""
from __future__ import annotations

import numpy as np

from .base import Model
from .vae import IMAGE, PIXELS, _check_widths, dense_stack_backward, dense_stack_forward


class GAN(Model):
    kind = "gan"

    def __init__(self, z_dim=64, g_hidden=(128, 256, 512), d_hidden=(512, 256, 128), slope=0.2,
                 dtype=np.float32, seed=0, backend=None):
        g_hidden, d_hidden = _check_widths("gan g_hidden", g_hidden), _check_widths("gan d_hidden", d_hidden)
        if int(z_dim) < 1 or not (0 <= float(slope) < 1):
            raise ValueError(f"gan needs z_dim >= 1 and 0 <= slope < 1; got z_dim={z_dim}, slope={slope}")
        cfg = dict(z_dim=int(z_dim), g_hidden=g_hidden, d_hidden=d_hidden, slope=float(slope))
        super().__init__("gan", cfg, dtype, seed, backend)
        self.g_names = [f"G.{i}" for i in range(len(g_hidden) + 1)]
        self.d_names = [f"D.{i}" for i in range(len(d_hidden) + 1)]
        for names, widths in ((self.g_names, [int(z_dim)] + g_hidden + [PIXELS]),
                              (self.d_names, [PIXELS] + d_hidden + [1])):
            for name, d_in, d_out in zip(names, widths[:-1], widths[1:]):
                self.add_linear(name, d_in, d_out)
        self._cache = None

    # -- the two networks as pure pairs over this model's parameters -----------------------------
    def generate_forward(self, z):
        """z (B, z_dim) -> images (B, 1, 28, 28) in [-1, 1], cache."""
        F = self.ops
        if z.ndim != 2 or z.shape[1] != self.config["z_dim"]:
            raise ValueError(f"gan: z must have shape (B, {self.config['z_dim']}); got {tuple(z.shape)}")
        h, stack = dense_stack_forward(F, self.params, self.g_names, z, "relu")
        img, th = F.tanh_forward(h)
        return img.reshape((z.shape[0],) + IMAGE), (stack, th)

    def generate_backward(self, dimg, cache):
        """dimg (B, 1, 28, 28) -> dz; G gradients accumulate into self.grads."""
        F = self.ops
        stack, th = cache
        dh = F.tanh_backward(dimg.reshape(dimg.shape[0], PIXELS), th)
        return dense_stack_backward(F, self.accumulate, self.g_names, dh, stack, "relu")

    def discriminate_forward(self, x):
        """x (B, 1, 28, 28) -> logits (B, 1), cache."""
        self.check_input(x, IMAGE)
        return dense_stack_forward(self.ops, self.params, self.d_names, x.reshape(x.shape[0], PIXELS),
                                   "leaky_relu", self.config["slope"])

    def discriminate_backward(self, dlogit, cache, accumulate=True):
        """dlogit (B, 1) -> dx (B, 1, 28, 28); D gradients accumulate unless accumulate=False."""
        dx = dense_stack_backward(self.ops, self.accumulate if accumulate else None, self.d_names,
                                  dlogit, cache, "leaky_relu")
        return dx.reshape((dx.shape[0],) + IMAGE)

    # -- Model interface ---------------------------------------------------------------------------
    def forward(self, z):
        """The generator: z (B, z_dim) -> images (B, 1, 28, 28)."""
        img, self._cache = self.generate_forward(z)
        return img

    def backward(self, dimg):
        if self._cache is None:
            raise RuntimeError("backward called before forward")
        dz = self.generate_backward(dimg, self._cache)
        self._cache = None
        return dz

    def sample(self, n, rng, batch=500):
        """n images (n, 1, 28, 28) in [-1, 1] from z ~ N(0, I), drawn with `rng`."""
        if int(n) < 1:
            raise ValueError(f"gan.sample: n must be >= 1; got {n}")
        z = rng.standard_normal((int(n), self.config["z_dim"])).astype(self.dtype)
        F = self.ops
        return F.xp.concatenate([self.generate_forward(F.asarray(z[i:i + batch]))[0]
                                 for i in range(0, int(n), batch)])
