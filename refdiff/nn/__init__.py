"""refdiff.nn: hand-written networks with manual backprop (reference).

`make_model(name, dtype=numpy.float32, seed=0, backend=None, **overrides)` builds a model
by name. Models are registered as "module:factory" strings so that importing refdiff.nn
stays cheap and each model lives in its own file.
"""
from __future__ import annotations

import importlib
import inspect

import numpy as np

MODELS = {
    "mlp": "refdiff.nn.mlp:ScoreMLP",
    "unet-seed": "refdiff.nn.unet:unet_seed",
    "unet-seed-fixed": "refdiff.nn.unet:unet_seed_fixed",
    "unet-seed-skip": "refdiff.nn.unet:unet_seed_skip",
    "unet-small": "refdiff.nn.unet:unet_small",
    "unet": "refdiff.nn.unet:UNet",
    "unet-ddpm": "refdiff.nn.unet_ddpm:unet_ddpm",
    "classifier": "refdiff.nn.classifier:Classifier",
    "vae": "refdiff.nn.vae:VAE",
    "gan": "refdiff.nn.gan:GAN",
}


def make_model(name, dtype=np.float32, seed=0, backend=None, **overrides):
    """Build the model registered as `name` with its defaults, changed by `overrides`."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    module, factory = MODELS[name].split(":")
    build = getattr(importlib.import_module(module), factory)
    params = inspect.signature(build).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        unknown = sorted(set(overrides) - set(params))
        if unknown:
            valid = [k for k in params if k not in ("dtype", "seed", "backend")]
            raise ValueError(f"bad options for model {name!r}: unknown parameter(s) {', '.join(unknown)}; "
                             f"it takes {', '.join(valid)}")
    try:
        return build(dtype=dtype, seed=seed, backend=backend, **overrides)
    except TypeError as exc:
        raise ValueError(f"bad options for model {name!r}: {exc}") from None


def model_from_spec(spec, backend=None):
    """Rebuild a model from `Model.spec()` (as stored in a checkpoint)."""
    return make_model(spec["name"], dtype=np.dtype(spec["dtype"]), backend=backend, **spec["config"])
