"""The UNet's forward mode as its forward on dual numbers (refdiff/nn/unet_jvp.py): what the
change of number system must keep. (Its derivatives against finite differences are in
tests/test_tangent.py, its use by sliced score matching in tests/test_ssm.py.)"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from refdiff.nn import make_model
from refdiff.nn.unet_jvp import Dual, TangentOps

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(channels=[4, 8], blocks=1, mid_channels=4, emb_dim=8, image_size=6)


def _setup(**cfg):
    m = make_model("unet", dtype=np.float64, seed=1, **{**TINY, **cfg})
    rng = np.random.default_rng(0)
    x, v, dy = (rng.standard_normal((2, 1, 6, 6)) for _ in range(3))
    return m, x, v, dy, np.array([0.2, 0.9])


def test_forward_jvp_leaves_a_pending_forward_alone():
    """forward, forward_jvp + backward_jvp, then backward: the backward of the first forward."""
    m, x, v, dy, t = _setup()
    m.zero_grad()
    m.forward(x, t)
    dx_ref, g_ref = m.backward(dy), {k: g.copy() for k, g in m.grads.items()}
    m.zero_grad()
    m.forward(x, t)
    m.forward_jvp(x, t, v)
    m.backward_jvp(dy, dy)
    m.zero_grad()
    np.testing.assert_array_equal(m.backward(dy), dx_ref)
    for k in g_ref:
        np.testing.assert_array_equal(m.grads[k], g_ref[k])
    assert m.ops.name == "numpy" and not isinstance(m.ops, TangentOps)


def test_tangent_of_a_linear_map_of_x():
    """With v = x the tangent of the skip term c(t) x is c(t) x itself: eps_dot - J_net x."""
    m, x, v, dy, t = _setup(input_skip=True, input_norm=False)
    e, ed = m.forward_jvp(x, t, x)
    m0 = make_model("unet", dtype=np.float64, seed=1, **TINY, input_norm=False)
    _, ed0 = m0.forward_jvp(x, t, x)            # the same network without the skip
    np.testing.assert_allclose(ed - ed0, m.skip_coefficient(t) * x, rtol=1e-12, atol=1e-14)


def test_bad_direction():
    m, x, v, dy, t = _setup()
    v[0, 0, 1, 1] = np.nan
    with pytest.raises(ValueError, match="direction v contains NaN or Inf"):
        m.forward_jvp(x, t, v)
    with pytest.raises(RuntimeError, match="before forward_jvp"):
        m.backward_jvp(dy, dy)


def test_dual_arithmetic():
    a, b = Dual(np.ones(3), np.full(3, 2.0)), Dual(np.full(3, 3.0), np.full(3, 5.0))
    c = np.array([2.0, 3.0, 4.0])
    np.testing.assert_array_equal((a + b).dot, [7, 7, 7])
    np.testing.assert_array_equal((a + c).dot, [2, 2, 2])      # a constant has no tangent
    np.testing.assert_array_equal((c * a).dot, [4, 6, 8])      # ndarray * Dual defers to Dual
    with pytest.raises(TypeError, match="Dual \\* Dual"):
        a * b


def test_ssm_cost_benchmark_runs(tmp_path):
    """benchmarks/ssm_cost.py (the exact-SSM cost table) imports and runs, tiny."""
    out = tmp_path / "ssm_cost.json"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "ssm_cost.py"), "--reps", "1",
                           "--dims", "2", "--batch", "4", "--unet-batch", "1", "--out", str(out)],
                          cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert set(result["unet-small"]["wall_s"]) == {"dsm", "ssm", "ssm-vr", "ssm-fd"}
    assert result["command"].startswith("python benchmarks/ssm_cost.py --reps 1")
