"""Golden end-to-end test: 10 Adam steps of DDPM training of a small UNet; every backend
(and the reference itself, to catch drift of the reference) must reproduce the stored
losses and every gradient of every step (tests/golden/, regenerate with
`python -m tests.golden.make_golden`). Here: the reference itself, and that the comparison
fails loudly; every accelerated backend's run is test_backend_ops.py's test_reproduces_golden."""
import numpy as np
import pytest

from refdiff_cuda.testing import compare_training
from tests.golden import make_golden as G


@pytest.fixture(scope="module", params=[np.float32, np.float64], ids=["float32", "float64"])
def golden(request):
    return request.param, G.load(request.param)


def _run(backend, golden, steps=None):
    dtype, gold = golden
    assert gold["config"] == G.CONFIG and int(gold["version"]) == G.VERSION, \
        "golden file out of date: python -m tests.golden.make_golden"
    losses, grads = G.train(backend, dtype, gold["xt"], gold["t"], gold["eps"], steps or G.STEPS, gold["config"])
    label = backend if isinstance(backend, str) else f"{backend.name} v{sorted(set(backend.versions.values()))}"
    compare_training(losses, grads, gold, dtype, label, steps)


def test_reference_reproduces_golden(golden):
    _run("numpy", golden)


def test_golden_comparison_fails_loudly(golden):
    """A gradient 10x the tolerance off (1e-2 in float32, 1e-8 in float64) is caught, by name."""
    dtype, gold = golden
    off = 1e-2 if dtype == np.float32 else 1e-8
    losses, grads = gold["losses"], [dict(g) for g in gold["grads"]]
    grads[3] = {k: (v * (1 + off) if k == "dec.0.blocks.1.conv2.weight" else v) for k, v in grads[3].items()}
    with pytest.raises(AssertionError, match=r"step 3 grad dec\.0\.blocks\.1\.conv2\.weight"):
        compare_training(losses, grads, gold, dtype, "tampered")
