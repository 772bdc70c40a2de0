"""numba-cuda backend vs the NumPy reference: every op and kernel version, float32 and
float64, and the golden training run.

Runs where numba.cuda can: on a CUDA GPU, or on the CPU under numba's simulator when
NUMBA_ENABLE_CUDASIM=1 is in the environment *before numba.cuda is imported*. A normal
pytest run gets here through test_backend_numba_cuda_sim.py, which runs this module in a
subprocess with the variable set (the rest of the suite keeps the real target). Under the
simulator every GPU thread is a Python thread, so shapes are tiny (op_case(tiny=True)),
and the golden run is the tiny one (tests/golden/unet_train_tiny_float64.npz, 2 steps); on a
GPU the full 10-step golden runs in both dtypes.
"""
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytest.importorskip("numba")

SIM = os.environ.get("NUMBA_ENABLE_CUDASIM", "") == "1"
if not SIM:
    import numba.cuda
    if not numba.cuda.is_available():
        pytest.skip("numba-cuda: no CUDA GPU here (the simulator run is test_backend_numba_cuda_sim.py)",
                    allow_module_level=True)

import refdiff_cuda as rc  # noqa: E402
from refdiff_cuda import PAIRS, REQUIRED  # noqa: E402
from refdiff_cuda.testing import check_adam, check_function, check_op, compare_training, op_case  # noqa: E402
from tests.golden import make_golden as G  # noqa: E402

BACKEND = rc.get_backend("numba-cuda")
CASES = [(op, v) for op in PAIRS if len(PAIRS[op]) == 2 for v in BACKEND.available_versions[op]]
SETTINGS = settings(max_examples=3 if SIM else 25, deadline=None, derandomize=SIM,
                    suppress_health_check=[HealthCheck.too_slow])


def test_simulator_is_what_runs():
    assert BACKEND.simulator == SIM
    assert BACKEND.container == ("host" if SIM else BACKEND.container)


@pytest.mark.parametrize("op, version", CASES, ids=[f"{o}-v{v}" for o, v in CASES])
@SETTINGS
@given(data=st.data(), dtype=st.sampled_from([np.float32, np.float64]))
def test_pair_agrees(op, version, data, dtype):
    inputs, kwargs = data.draw(op_case(op, tiny=SIM))
    check_op(op, rc.get_backend("numba-cuda", versions={op: version}), inputs, dtype, kwargs)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_single_ops_agree(dtype):
    rng = np.random.default_rng(0)
    x, e, z = (rng.standard_normal((2, 1, 3, 3)) for _ in range(3))
    for noise in (z, None):
        check_function("ddpm_step", BACKEND, [x, e, noise, 0.02, 0.3, 0.1], dtype)
        check_function("em_step", BACKEND, [x, e, noise, 0.7, 1.3, 1e-3], dtype)
    check_function("time_embedding", BACKEND, [np.array([0.0, 1.0, 1.0, 999.0]), 7], dtype, dict(dtype=dtype))
    check_adam(BACKEND, (3, 5), dtype, steps=3, weight_decay=0.1)


def test_required_ops_are_accelerated():
    names = {n for op in REQUIRED for n in PAIRS[op]}
    assert not names & set(BACKEND.fallback)


@pytest.mark.parametrize("versions", [1] if SIM else [1, None])
def test_reproduces_golden(versions):
    be = rc.get_backend("numba-cuda", versions=versions)
    runs = [(np.float64, True)] if SIM else [(np.float32, False), (np.float64, False)]
    for dtype, tiny in runs:
        gold = G.load(dtype, tiny)
        steps = len(gold["losses"])
        losses, grads = G.train(be, dtype, gold["xt"], gold["t"], gold["eps"], steps, gold["config"])
        compare_training(losses, grads, gold, dtype, f"numba-cuda v{versions or 'newest'}{' (simulator)' if SIM else ''}")
