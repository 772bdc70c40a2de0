"""Every model's backward (and backward_jvp) consumes the caches of one forward: called before
any forward, or a second time after one forward, it raises the same clear RuntimeError instead
of reusing stale caches or failing somewhere inside."""
import numpy as np
import pytest

from refdiff.ddpm import model_input_shape
from refdiff.nn import make_model


def _calls(name):
    """-> (model, forward(), backward()) for a small float64 model of `name`."""
    small = dict(mlp=dict(dim=3, widths=[4]), classifier=dict(channels=[1, 2], hidden=3),
                 vae=dict(hidden=[4], latent=2), gan=dict(z_dim=2, g_hidden=[3], d_hidden=[3]),
                 **{"unet-ddpm": dict(image_size=8, channels=[4, 8], attention=[], dropout=0.0, max_groups=2)}).get(name, {})
    m = make_model(name, dtype=np.float64, **small)
    rng = np.random.default_rng(0)
    if name == "classifier":
        x = rng.uniform(-1, 1, (2, 1, 28, 28))
        return m, lambda: m.forward(x), lambda: m.backward(np.ones((2, 10)))
    if name == "vae":
        x, e = rng.uniform(-1, 1, (2, 1, 28, 28)), rng.standard_normal((2, 2))
        return m, lambda: m.forward(x, e), lambda: m.backward(np.ones((2, 784)), np.ones((2, 2)), np.ones((2, 2)))
    if name == "gan":
        z = rng.standard_normal((2, 2))
        return m, lambda: m.forward(z), lambda: m.backward(np.ones((2, 1, 28, 28)))
    shape = (2,) + model_input_shape(m)
    x, t = rng.uniform(-1, 1, shape), np.full(2, 0.5)
    return m, lambda: m.forward(x, t), lambda: m.backward(np.ones(shape))


@pytest.mark.parametrize("name", ["mlp", "unet-seed", "unet-ddpm", "classifier", "vae", "gan"])
def test_backward_needs_its_own_forward(name):
    m, forward, backward = _calls(name)
    with pytest.raises(RuntimeError, match="^backward called before forward$"):
        backward()
    forward()
    backward()
    with pytest.raises(RuntimeError, match="^backward called before forward$"):
        backward()


@pytest.mark.parametrize("name", ["mlp", "unet-seed"])
def test_backward_jvp_needs_its_own_forward_jvp(name):
    m = make_model(name, dtype=np.float64, **(dict(dim=3, widths=[4]) if name == "mlp" else {}))
    shape = (2,) + model_input_shape(m)
    x, t = np.random.default_rng(1).uniform(-1, 1, shape), np.full(2, 0.5)
    with pytest.raises(RuntimeError, match="^backward_jvp called before forward_jvp$"):
        m.backward_jvp(np.ones(shape), np.ones(shape))
    m.forward_jvp(x, t, np.ones(shape))
    m.backward_jvp(np.ones(shape), np.ones(shape))
    with pytest.raises(RuntimeError, match="^backward_jvp called before forward_jvp$"):
        m.backward_jvp(np.ones(shape), np.ones(shape))
