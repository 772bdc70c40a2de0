"""cupy backend vs the NumPy reference: every op and version (hypothesis), the sampler steps,
Adam, and the full golden training run in float32 and float64. Runs where CuPy sees a GPU;
shows as skipped, with the reason, elsewhere."""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import refdiff_cuda as rc
from refdiff_cuda import PAIRS, REQUIRED
from refdiff_cuda.testing import check_adam, check_function, check_op, compare_training, op_case
from tests.golden import make_golden as G

try:
    BACKEND = rc.get_backend("cupy")
except ValueError as exc:
    pytest.skip(str(exc), allow_module_level=True)

CASES = [(op, v) for op in PAIRS if len(PAIRS[op]) == 2 for v in BACKEND.available_versions[op]]


@pytest.mark.gpu
@pytest.mark.parametrize("op, version", CASES, ids=[f"{o}-v{v}" for o, v in CASES])
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), dtype=st.sampled_from([np.float32, np.float64]))
def test_pair_agrees(op, version, data, dtype):
    inputs, kwargs = data.draw(op_case(op))
    check_op(op, rc.get_backend("cupy", versions={op: version}), inputs, dtype, kwargs)


@pytest.mark.gpu
@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_single_ops_agree(version, dtype):
    be = rc.get_backend("cupy", versions=version)
    rng = np.random.default_rng(0)
    x, e, z = (rng.standard_normal((3, 1, 5, 5)) for _ in range(3))
    for noise in (z, None):
        check_function("ddpm_step", be, [x, e, noise, 0.02, 0.3, 0.1], dtype)
        check_function("em_step", be, [x, e, noise, 0.7, 1.3, 1e-3], dtype)
    check_function("time_embedding", be, [np.array([0.0, 1.0, 1.0, 999.0]), 7], dtype, dict(dtype=dtype))
    check_adam(be, (3, 5, 7), dtype, steps=4, weight_decay=0.1)


@pytest.mark.gpu
def test_required_ops_are_accelerated():
    assert not {n for op in REQUIRED for n in PAIRS[op]} & set(BACKEND.fallback)


@pytest.mark.gpu
@pytest.mark.parametrize("versions", [1, None], ids=["v1", "newest"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_reproduces_golden(versions, dtype):
    gold = G.load(dtype)
    losses, grads = G.train(rc.get_backend("cupy", versions=versions), dtype, gold["xt"], gold["t"], gold["eps"],
                            G.STEPS, gold["config"])
    compare_training(losses, grads, gold, dtype, f"cupy {versions or 'newest'}")


@pytest.mark.gpu
@pytest.mark.parametrize("sampler", ["ancestral", "ancestral-clip", "ddim", "em_vp"])
def test_samplers_run_unchanged(sampler):
    """refdiff.ddpm's samplers on a CuPy-backed UNet (state on the device, the backend's
    ddpm_step / em_step ops) give the reference's images from the same seed."""
    from refdiff import ddpm
    from refdiff.nn import make_model
    from refdiff.sde import DDPMSchedule
    from refdiff_cuda.testing import TOL, assert_agree
    cfg = dict(channels=[4, 8], blocks=1, mid_channels=4, emb_dim=8, image_size=6, seed=5)
    out = {}
    for name in ("numpy", "cupy"):
        m = make_model("unet", dtype=np.float64, backend=name, **cfg)
        rng, shape, sched = np.random.default_rng(3), (3, 1, 6, 6), DDPMSchedule(num_steps=4)
        if sampler.startswith("ancestral"):
            out[name] = ddpm.ancestral(m, sched, shape, rng, clip=sampler.endswith("clip"))
        elif sampler == "ddim":
            out[name] = ddpm.ddim(m, sched, shape, rng, steps=2, eta=0.5)
        else:
            out[name] = ddpm.em_vp(m, shape, rng, steps=4)
    assert isinstance(out["cupy"], np.ndarray)
    assert_agree(out["cupy"], out["numpy"], TOL[np.dtype(np.float64)], f"{sampler} on cupy")
