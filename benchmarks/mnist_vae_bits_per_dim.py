"""The VAE's likelihood bound on held-out MNIST in bits/dim, beside the diffusion likelihood.

The first n held-out digits of mnist5k (the images `refdiff likelihood --split heldout --n n`
scores), dequantised with seed 0, under a VAE checkpoint (`refdiff train --model vae`):
the ELBO and the importance-weighted bound (IWAE, k draws) with the continuous Bernoulli as
the decoder's density, in the 8-bit bits/dim convention of refdiff.likelihood
(refdiff/vae_likelihood.py says why that makes the numbers comparable). Mean and standard
error over the images; also, for contrast, the training loss's Bernoulli "ELBO" (BCE + KL per
image over 784 ln 2, plus 8), which is not a bound on any density over pixel values.

    python benchmarks/mnist_vae_bits_per_dim.py --checkpoint runs/vae/checkpoint.npz [--n 500]
        [--samples 10] [--k 100] --out benchmarks/results/mnist_vae_heldout_bits_per_dim.json
"""
import argparse
import math
import os
import sys

import numpy as np

from refdiff.checkpoint import load_model
from refdiff.data.images import load_images
from refdiff.vae_likelihood import softplus, vae_bits_per_dim

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def stats(v):
    return dict(mean=float(np.mean(v)), se=float(np.std(v, ddof=1) / math.sqrt(len(v))))


def bernoulli_loss_bpd(model, pixels, rng):
    """The training objective's BCE + KL per image (one draw), as 'bits/dim' + 8: no bound."""
    F = model.ops
    x = pixels.astype(np.float64) / 127.5 - 1.0
    logits, u, mu, logvar = model.forward(F.asarray(x.astype(model.dtype)),
                                          F.asarray(rng.standard_normal((len(x), model.config["latent"]))))
    l, u, mu, logvar = (np.asarray(F.to_numpy(a), np.float64) for a in (logits, u, mu, logvar))
    bce = np.sum(softplus(l) - u * l, axis=1)
    kl = 0.5 * np.sum(mu * mu + np.exp(logvar) - 1.0 - logvar, axis=1)
    return (bce + kl) / (784 * math.log(2)) + 8.0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--samples", type=int, default=10, help="draws for the ELBO's reconstruction term")
    ap.add_argument("--k", type=int, default=100, help="draws of the IWAE bound")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "mnist_vae_heldout_bits_per_dim.json"))
    a = ap.parse_args()
    model, _, meta = load_model(a.checkpoint, expect="vae", use_ema=True)
    x, _ = load_images("mnist5k", "heldout")
    pixels = np.round((x[:a.n].astype(np.float64) + 1.0) * 127.5).astype(np.int64)   # as refdiff likelihood
    res = vae_bits_per_dim(model, pixels, np.random.default_rng(0), samples=a.samples, k=a.k)
    from _common import environment, write_json
    out = dict(benchmark="VAE bound on held-out MNIST, bits/dim (continuous Bernoulli decoder, 8-bit convention)",
               command=" ".join(["python benchmarks/mnist_vae_bits_per_dim.py"] + sys.argv[1:]),
               checkpoint=dict(path=os.path.abspath(a.checkpoint), epoch=meta.get("epoch")),
               n=a.n, samples=a.samples, k=a.k,
               elbo_bits_per_dim=stats(res["elbo_bpd"]), iwae_bits_per_dim=stats(res["iwae_bpd"]),
               bernoulli_training_loss_bits_per_dim_not_a_bound=stats(bernoulli_loss_bpd(model, pixels,
                                                                                        np.random.default_rng(1))),
               convention="u = (p + v) / 256 on [0, 1), continuous Bernoulli p(u | z) (Loaiza-Ganem & Cunningham "
                          "2019); bpd = -bound / (784 ln 2) + 8 (refdiff.likelihood.bits_per_dim, data_range (0, 1))")
    write_json(a.out, dict(out, environment=environment()))
    print(f"ELBO {out['elbo_bits_per_dim']['mean']:.4f} +- {out['elbo_bits_per_dim']['se']:.4f}  "
          f"IWAE-{a.k} {out['iwae_bits_per_dim']['mean']:.4f} +- {out['iwae_bits_per_dim']['se']:.4f} bits/dim")


if __name__ == "__main__":
    main()
