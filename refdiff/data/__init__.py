"""Data: 2-D toy distributions (`toy`) and image sources (`images`).

Every draw takes an explicit numpy.random.Generator.
"""
from .toy import TOY, GaussianMixture, make_toy, moons, ring, swiss_roll  # noqa: F401


def __getattr__(name):
    # Image loaders live in refdiff.data.images; imported lazily. (`from . import images`
    # here would call this __getattr__ again before the submodule is bound.)
    import importlib
    images = importlib.import_module(__name__ + ".images")
    try:
        return getattr(images, name)
    except AttributeError:
        raise AttributeError(f"module 'refdiff.data' has no attribute {name!r}") from None
