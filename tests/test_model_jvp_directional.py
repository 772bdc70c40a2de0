"""The models' forward-mode pass and its adjoint (forward_jvp / backward_jvp: refdiff.nn.unet_jvp
for the seed UNet, unet_ddpm's for the modern one) checked by value along random directions,
float64, small enough to run under mutation testing (setup.cfg [mutmut] selects this file):

- the tangent against central differences of the forward along the same direction v;
- the adjoint's dx along one random direction of x (two evaluations);
- every parameter's gradient at once, along one joint random direction of all parameters
  (two evaluations: a wrong entry would have to be orthogonal to a random direction to hide).

The entry-by-entry checks of the same passes are tests/test_tangent.py's and
tests/test_unet_ddpm.py's whole-network finite-difference tests (slower; deselected there)."""
import numpy as np
import pytest

from tests.helpers import assert_close, assert_fd, fd_direction, fd_joint_direction, fd_tangent, inner
from tests.test_tangent import _model as seed_unet
from tests.test_unet_ddpm import _model as ddpm_unet


def _model(kind):
    """The tiny float64 networks of test_tangent.py (seed UNet) and test_unet_ddpm.py (labels,
    dropout, attention), norms away from (1, 0) so every term of their tangent counts."""
    return ddpm_unet() if kind == "ddpm" else seed_unet(kind)


@pytest.mark.parametrize("kind", ["odd", "even", "skip", "ddpm"])
def test_forward_jvp_and_its_adjoint_along_random_directions(kind):
    model, rng = _model(kind), np.random.default_rng(7)
    c = model.config
    x = rng.standard_normal((2, c["in_channels"], c["image_size"], c["image_size"]))
    t, v = rng.uniform(0.05, 1.0, 2), rng.standard_normal(x.shape)
    if kind == "ddpm":     # labels and dropout on, the same masks at every evaluation
        extra = lambda: (np.array([2, 0]), np.random.default_rng(12))
    else:
        extra = lambda: ()
    e, e_dot = model.forward_jvp(x, t, v, *extra())
    assert_close(e, model.forward(x, t, *extra()), name="primal", rtol=0, atol=0)
    assert_fd(e_dot, fd_tangent(lambda z: model.forward(z, t, *extra()), x, v), name="tangent vs FD")

    dy, dydot = rng.standard_normal((2,) + e.shape)
    model.zero_grad()
    model.forward_jvp(x, t, v, *extra())
    dx = model.backward_jvp(dy, dydot)

    def S():
        a, b = model.forward_jvp(x, t, v, *extra())
        return inner(a, dy, b, dydot)

    u = rng.standard_normal(x.shape)
    assert_fd(np.sum(dx * u), fd_direction(S, x, u), name="dx along a random direction")
    deltas = {k: rng.standard_normal(p.shape) for k, p in model.params.items()}
    analytic = sum(float(np.sum(model.grads[k] * d)) for k, d in deltas.items())
    assert_fd(analytic, fd_joint_direction(S, model.params, deltas), name="all parameters along one direction")
