"""The MNIST CNN that scores generated images (report §3.4.3), by hand; its layers
and training settings are those of the report's code.

    x (B, 1, 28, 28) -> Conv(1->32, 3, pad 1) -> ReLU -> MaxPool 2     (B, 32, 14, 14)
                     -> Conv(32->64, 3, pad 1) -> ReLU -> MaxPool 2    (B, 64, 7, 7)
                     -> flatten (B, 3136) -> Linear 128 -> ReLU        (B, 128) = features
                     -> Linear 10                                       (B, 10)  = logits

421,642 parameters. Trained with cross-entropy (stable log-softmax), Adam 1e-3, batch 64,
10 epochs. The 128-d penultimate layer is the feature space of refdiff.image_scores'
Fréchet distance (an FID with an extractor that fits MNIST).

refdiff.objectives.ClassifierObjective adds two things the report does not have, because 4,000 training
images (mnist5k) are a small set for a 421k-parameter network: random shifts of up to
`shift` pixels (padding with the background value -1), and an exponential moving average
of the weights (Polyak averaging: refdiff.optim.EMA, decay min(0.999, (1+n)/(10+n)) at
step n, so over the 630 steps of 10 epochs it averages roughly the last 1/(1-d) ~ 60-70
steps), which is what a checkpoint's user loads (`load_model(..., use_ema=True)`). With a
constant Adam step of 1e-3 the raw weights' held-out accuracy swings by about a point from
epoch to epoch; the average does not.
"""
from __future__ import annotations

import numpy as np

from .base import Model

IMAGE = (1, 28, 28)


class Classifier(Model):
    kind = "classifier"

    def __init__(self, channels=(32, 64), hidden=128, classes=10, dtype=np.float32, seed=0, backend=None):
        c1, c2 = (int(c) for c in channels)
        if min(c1, c2, int(hidden), int(classes)) < 1:
            raise ValueError(f"classifier needs positive channels, hidden, classes; got {channels}, {hidden}, {classes}")
        super().__init__("classifier", dict(channels=[c1, c2], hidden=int(hidden), classes=int(classes)),
                         dtype, seed, backend)
        self.add_conv("conv1", 1, c1, 3)
        self.add_conv("conv2", c1, c2, 3)
        self.add_linear("fc1", c2 * 7 * 7, int(hidden))
        self.add_linear("fc2", int(hidden), int(classes))
        self._cache = None

    def _trunk(self, x):
        """x -> 128-d features and the caches of every op."""
        F, p = self.ops, self.params
        self.check_input(x, IMAGE)
        caches = []
        h = x
        for name in ("conv1", "conv2"):
            h, c_conv = F.conv2d_forward(h, p[name + ".weight"], p[name + ".bias"], stride=1, padding=1)
            h, c_relu = F.relu_forward(h)
            h, c_pool = F.max_pool2d_forward(h, 2)
            caches.append((c_conv, c_relu, c_pool))
        flat_shape = h.shape
        h, c_fc1 = F.linear_forward(h.reshape(h.shape[0], -1), p["fc1.weight"], p["fc1.bias"])
        h, c_relu = F.relu_forward(h)
        return h, (caches, flat_shape, c_fc1, c_relu)

    def features(self, x):
        """x (B, 1, 28, 28) -> the penultimate activations (B, 128); keeps no cache."""
        return self._trunk(x)[0]

    def forward(self, x):
        """x (B, 1, 28, 28) in [-1, 1] -> logits (B, 10); keeps the caches for `backward`."""
        h, trunk = self._trunk(x)
        logits, c_fc2 = self.ops.linear_forward(h, self.params["fc2.weight"], self.params["fc2.bias"])
        self._cache = (trunk, c_fc2)
        return logits

    def logits_and_features(self, x):
        """Both outputs of one pass, without caches (for evaluation)."""
        h, _ = self._trunk(x)
        return self.ops.linear_forward(h, self.params["fc2.weight"], self.params["fc2.bias"])[0], h

    def backward(self, dlogits):
        """dlogits (B, 10) -> dx (B, 1, 28, 28); parameter gradients accumulate into self.grads."""
        if self._cache is None:
            raise RuntimeError("backward called before forward")
        F, acc = self.ops, self.accumulate
        (caches, flat_shape, c_fc1, c_relu), c_fc2 = self._cache
        dh, dw, db = F.linear_backward(dlogits, c_fc2)
        acc("fc2.weight", dw), acc("fc2.bias", db)
        dh, dw, db = F.linear_backward(F.relu_backward(dh, c_relu), c_fc1)
        acc("fc1.weight", dw), acc("fc1.bias", db)
        dh = dh.reshape(flat_shape)
        for name, (c_conv, c_relu2, c_pool) in zip(("conv2", "conv1"), reversed(caches)):
            dh = F.relu_backward(F.max_pool2d_backward(dh, c_pool), c_relu2)
            dh, dw, db = F.conv2d_backward(dh, c_conv)
            acc(name + ".weight", dw), acc(name + ".bias", db)
        self._cache = None
        return dh

    def predict(self, x, batch=500):
        """Logits for any number of images, in batches, no caches."""
        xp = self.ops.xp
        return xp.concatenate([self.logits_and_features(x[i:i + batch])[0] for i in range(0, x.shape[0], batch)])


def random_shift(x, rng, max_shift, fill=-1.0):
    """Translate each image by integers (dy, dx) ~ U{-s..s}^2, filling with `fill`
    (the background of [-1, 1] images). x (B, C, H, W) host array -> new array."""
    if max_shift == 0:
        return x
    B, _, H, W = x.shape
    s = int(max_shift)
    padded = np.full((B, x.shape[1], H + 2 * s, W + 2 * s), fill, dtype=x.dtype)
    padded[:, :, s:s + H, s:s + W] = x
    oy, ox = rng.integers(0, 2 * s + 1, size=(2, B))
    rows = oy[:, None] + np.arange(H)[None, :]                          # (B, H)
    cols = ox[:, None] + np.arange(W)[None, :]                          # (B, W)
    return padded[np.arange(B)[:, None, None, None], np.arange(x.shape[1])[None, :, None, None],
                  rows[:, None, :, None], cols[:, None, None, :]]
