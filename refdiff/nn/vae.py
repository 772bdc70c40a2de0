"""Variational auto-encoder of the report's comparison (§3.4.3), by hand; its layers
and training settings are those of the report's code.

    encoder   u = (x + 1)/2 flattened (B, 784) -> 512 -> 128 (ReLU) -> mu, logvar (B, 16)
    latent    z = mu + e^(logvar/2) eps,  eps ~ N(0, I)            (reparameterisation)
    decoder   z -> 128 -> 512 (ReLU) -> 784 logits;  p(u | z) = Bernoulli(sigmoid(logits))
    loss      BCE(sigmoid(logits), u) summed + KL(N(mu, e^logvar) || N(0, I)) summed
              = the negative ELBO of Kingma & Welling 2014 (eq. 10), summed over the batch

The data are in [-1, 1]; the VAE models u = (x + 1)/2 in [0, 1] and `sample` maps the
decoder mean back with 2 s - 1. The decoder's sigmoid is folded into the loss
(`bce_with_logits`), the stable form of the same function. Hidden activations are ReLU
(the report does not say; ReLU is what its code family uses).

`dense_stack_forward/_backward` chain linear layers with an activation between them; the
GAN reuses them.
"""
from __future__ import annotations

import numpy as np

from .base import Model

IMAGE = (1, 28, 28)
PIXELS = 784


# --- a stack of dense layers, shared with gan.py --------------------------------------------------
def dense_stack_forward(F, params, names, h, act="relu", slope=0.2):
    """h -> linear(names[0]) -> act -> ... -> linear(names[-1]) (no activation after the last).
    Returns (out, caches)."""
    caches = []
    for i, name in enumerate(names):
        h, lin = F.linear_forward(h, params[name + ".weight"], params[name + ".bias"])
        a = None
        if i < len(names) - 1:
            h, a = F.leaky_relu_forward(h, slope) if act == "leaky_relu" else F.relu_forward(h)
        caches.append((lin, a))
    return h, caches


def dense_stack_backward(F, accumulate, names, dout, caches, act="relu"):
    """Backward of dense_stack_forward; parameter gradients go to accumulate(name, g).
    `accumulate=None` propagates to the input only (e.g. the GAN's G step through D)."""
    dh = dout
    for i in reversed(range(len(names))):
        lin, a = caches[i]
        if a is not None:
            dh = F.leaky_relu_backward(dh, a) if act == "leaky_relu" else F.relu_backward(dh, a)
        dh, dw, db = F.linear_backward(dh, lin)
        if accumulate is not None:
            accumulate(names[i] + ".weight", dw)
            accumulate(names[i] + ".bias", db)
    return dh


def _check_widths(name, widths):
    widths = [int(w) for w in widths]
    if not widths or min(widths) < 1:
        raise ValueError(f"{name} must be a non-empty list of positive widths; got {widths}")
    return widths


class VAE(Model):
    kind = "vae"

    def __init__(self, hidden=(512, 128), latent=16, dtype=np.float32, seed=0, backend=None):
        hidden = _check_widths("vae hidden", hidden)
        if int(latent) < 1:
            raise ValueError(f"vae latent must be >= 1; got {latent}")
        super().__init__("vae", dict(hidden=hidden, latent=int(latent)), dtype, seed, backend)
        d = PIXELS
        self.enc = [f"enc.{i}" for i in range(len(hidden))]
        for name, w in zip(self.enc, hidden):
            self.add_linear(name, d, w)
            d = w
        self.add_linear("mu", d, int(latent))
        self.add_linear("logvar", d, int(latent))
        # decoder mirrors the encoder: latent -> reversed(hidden) -> 784
        self.dec = [f"dec.{i}" for i in range(len(hidden) + 1)]
        d = int(latent)
        for name, w in zip(self.dec, list(reversed(hidden)) + [PIXELS]):
            self.add_linear(name, d, w)
            d = w
        self._cache = None

    # -- pieces ---------------------------------------------------------------------------------
    def encode(self, x):
        """x (B, 1, 28, 28) in [-1, 1] -> mu, logvar (B, latent), cache."""
        F, p = self.ops, self.params
        self.check_input(x, IMAGE)
        u = ((x + 1) * 0.5).reshape(x.shape[0], PIXELS)
        h, enc = dense_stack_forward(F, p, self.enc, u)
        h, a = F.relu_forward(h)                         # the last hidden layer is activated too
        mu, lin_mu = F.linear_forward(h, p["mu.weight"], p["mu.bias"])
        logvar, lin_lv = F.linear_forward(h, p["logvar.weight"], p["logvar.bias"])
        return mu, logvar, (enc, a, lin_mu, lin_lv)

    def decode(self, z):
        """z (B, latent) -> pixel logits (B, 784), cache."""
        return dense_stack_forward(self.ops, self.params, self.dec, z)

    def forward(self, x, eps):
        """x (B, 1, 28, 28), eps (B, latent) ~ N(0, I) -> (logits (B, 784), u (B, 784), mu, logvar).

        u = (x + 1)/2 is the Bernoulli target. Keeps the caches for `backward`."""
        F = self.ops
        if tuple(eps.shape) != (x.shape[0], self.config["latent"]):
            raise ValueError(f"vae: eps must have shape ({x.shape[0]}, {self.config['latent']}); got {tuple(eps.shape)}")
        mu, logvar, enc = self.encode(x)
        z, rep = F.gaussian_reparam_forward(mu, logvar, eps.astype(mu.dtype))
        logits, dec = self.decode(z)
        self._cache = (enc, rep, dec, x.shape)
        return logits, ((x + 1) * 0.5).reshape(x.shape[0], PIXELS), mu, logvar

    def backward(self, dlogits, dmu, dlogvar):
        """Gradients of the loss w.r.t. logits, and w.r.t. mu, logvar directly (the KL term)
        -> dx (B, 1, 28, 28); parameter gradients accumulate into self.grads."""
        if self._cache is None:
            raise RuntimeError("backward called before forward")
        F, acc = self.ops, self.accumulate
        (enc, a, lin_mu, lin_lv), rep, dec, shape = self._cache
        dz = dense_stack_backward(F, acc, self.dec, dlogits, dec)
        dmu_r, dlv_r, _ = F.gaussian_reparam_backward(dz, rep)
        dh_mu, dw, db = F.linear_backward(dmu + dmu_r, lin_mu)
        acc("mu.weight", dw), acc("mu.bias", db)
        dh_lv, dw, db = F.linear_backward(dlogvar + dlv_r, lin_lv)
        acc("logvar.weight", dw), acc("logvar.bias", db)
        dh = F.relu_backward(dh_mu + dh_lv, a)
        du = dense_stack_backward(F, acc, self.enc, dh, enc)
        self._cache = None
        return (0.5 * du).reshape(shape)

    def sample(self, n, rng):
        """n images (n, 1, 28, 28) in [-1, 1]: z ~ N(0, I), pixel = 2 sigmoid(decoder(z)) - 1
        (the decoder's mean, not a Bernoulli draw)."""
        if int(n) < 1:
            raise ValueError(f"vae.sample: n must be >= 1; got {n}")
        F = self.ops
        z = F.asarray(rng.standard_normal((int(n), self.config["latent"])).astype(self.dtype))
        logits, _ = self.decode(z)
        s, _ = F.sigmoid_forward(logits)
        return (2 * s - 1).reshape((int(n),) + IMAGE)
