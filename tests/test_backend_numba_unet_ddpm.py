"""unet-ddpm on the numba backend: one forward and backward of a small configuration (both
resolutions' convs, a 1x1 skip, attention with two heads, nearest-neighbour upsampling and
dropout on, from the same seed) against the reference in float64: the output, dx and every
parameter gradient, for the newest kernels and for every op's version 1. The ops one by one
are in test_backend_ops.py; this checks that the model's layouts (channel-major views between
ops) and the dropout draws line up."""
import numpy as np
import pytest

pytest.importorskip("numba", reason="the numba backend needs numba (pip install 'refdiff[numba]')")

from refdiff.nn import make_model  # noqa: E402
from refdiff_cuda.testing import TOL, assert_agree  # noqa: E402

# One forward and backward chains ~40 ops, each within TOL[float64] of the reference; the
# training-run tolerance (10x the per-op one) covers the chain.
CFG = dict(channels=(8, 16), attention=(1,), heads=2, dropout=0.3, image_size=8, max_groups=4, zero_init=False)


def _step(backend):
    m = make_model("unet-ddpm", dtype=np.float64, backend=backend, seed=3, **CFG)
    rng = np.random.default_rng(0)
    x, t = rng.standard_normal((3, 1, 8, 8)), np.array([0.05, 0.5, 0.95])
    y = m.forward(m.ops.asarray(x), t, rng=np.random.default_rng(7))
    m.zero_grad()
    dx = m.backward(m.ops.asarray(rng.standard_normal(y.shape)))
    return m.ops.to_numpy(y), m.ops.to_numpy(dx), {k: m.ops.to_numpy(g) for k, g in m.grads.items()}


@pytest.mark.parametrize("versions", [None, 1], ids=["newest", "v1"])
def test_unet_ddpm_step_agrees_with_the_reference(versions):
    import refdiff_cuda as rc
    be = rc.get_backend("numba", versions=versions)
    y0, dx0, g0 = _step("numpy")
    y1, dx1, g1 = _step(be)
    tol = TOL["train64"]
    assert np.abs(y0).max() > 0.1 and set(g0) == set(g1)
    assert_agree(y1, y0, tol, "output")
    assert_agree(dx1, dx0, tol, "dx")
    for k in g0:
        assert_agree(g1[k], g0[k], tol, f"grad {k}")
