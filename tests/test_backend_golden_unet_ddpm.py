"""The second golden run: 10 Adam steps of a small unet-ddpm (residual blocks, a 1x1 skip conv,
two-head attention, upsampling, three classes and the null label, dropout 0.2 from per-step
seeds) from the NumPy reference, stored in tests/golden/unet_ddpm_train_*.npz (regenerate with
`python -m tests.golden.make_golden`). The reference itself must reproduce it (drift of the
reference is caught), and so must every accelerated backend available here, at its newest
kernels and at version 1 (the literal ports), within refdiff_cuda.testing.TOL["train32"/
"train64"]; a backend that cannot run here is skipped with its reason."""
import numpy as np
import pytest

from refdiff_cuda import backend_status, get_backend
from refdiff_cuda.testing import compare_training
from tests.golden import make_golden as G

STATUS = backend_status()


@pytest.fixture(scope="module", params=[np.float32, np.float64], ids=["float32", "float64"])
def golden(request):
    gold = G.load_ddpm(request.param)
    assert gold["config"] == G.DDPM_CONFIG and int(gold["version"]) == G.DDPM_VERSION, \
        "golden file out of date: python -m tests.golden.make_golden"
    return request.param, gold


def _run(backend, label, golden):
    dtype, gold = golden
    losses, grads = G.train_ddpm(backend, dtype, gold["xt"], gold["t"], gold["eps"], gold["labels"])
    compare_training(losses, grads, gold, dtype, label)


def test_reference_reproduces_the_unet_ddpm_golden_run(golden):
    _run("numpy", "numpy", golden)


@pytest.mark.parametrize("name", ["numba", "cupy", "numba-cuda"])
@pytest.mark.parametrize("versions", [None, 1], ids=["newest", "v1"])
def test_backend_reproduces_the_unet_ddpm_golden_run(name, versions, golden):
    if STATUS[name] != "ok":
        pytest.skip(f"{name}: {STATUS[name]}")
    _run(get_backend(name, versions=versions), f"{name} v{versions or 'newest'}", golden)


def test_the_golden_run_sees_dropout_and_labels(golden):
    """The file pins what it claims to: another dropout seed or other labels change step 0's
    gradients far beyond the tolerance (so a backend drawing its own masks, or ignoring
    labels, cannot pass)."""
    dtype, gold = golden
    seed = G.DROPOUT_SEED
    try:
        G.DROPOUT_SEED = seed + 1
        losses, grads = G.train_ddpm("numpy", dtype, gold["xt"], gold["t"], gold["eps"], gold["labels"], steps=1)
    finally:
        G.DROPOUT_SEED = seed
    with pytest.raises(AssertionError):
        compare_training(losses, grads, gold, dtype, "other dropout seed", steps=1)
    other = (gold["labels"] + 1) % 4
    losses, grads = G.train_ddpm("numpy", dtype, gold["xt"], gold["t"], gold["eps"], other, steps=1)
    with pytest.raises(AssertionError, match="label.weight"):
        compare_training(losses, grads, gold, dtype, "other labels", steps=1)
