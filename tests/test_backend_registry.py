"""refdiff_cuda.get_backend: names, versions, one clear error per missing piece; the
reference sampler steps against the formulas they stand for."""
import os

import numpy as np
import pytest

import refdiff_cuda as rc
from refdiff.backend import REFERENCE
from refdiff.nn import steps as RS


def test_numpy_is_the_reference():
    be = rc.get_backend("numpy")
    for k, v in vars(REFERENCE).items():
        assert getattr(be, k) is v
    assert be.ddpm_step is RS.ddpm_step and be.em_step is RS.em_step


def test_unknown_backend():
    with pytest.raises(ValueError, match="unknown backend 'tpu'"):
        rc.get_backend("tpu")


def test_bad_versions():
    pytest.importorskip("numba")
    with pytest.raises(ValueError, match="no kernels for op 'softmax'"):
        rc.get_backend("numba", versions={"softmax": 1})
    with pytest.raises(ValueError, match=r"'conv2d' has versions \[1, 2, 3, 4, 5\]; got 7"):
        rc.get_backend("numba", versions={"conv2d_forward": 7})
    with pytest.raises(ValueError, match="versions must be"):
        rc.get_backend("numba", versions="fast")
    be = rc.get_backend("numba", versions={"conv2d_backward": 1})   # a member selects its pair
    assert be.versions["conv2d"] == 1 and be.versions["silu"] == max(be.available_versions["silu"])


def test_cupy_missing_or_no_gpu_is_one_clear_error():
    try:
        import cupy  # noqa: F401
        pytest.skip("cupy is installed here")
    except ImportError:
        pass
    with pytest.raises(ValueError, match=r"backend 'cupy' needs CuPy.*pip install"):
        rc.get_backend("cupy")


@pytest.mark.skipif(os.environ.get("NUMBA_ENABLE_CUDASIM") == "1", reason="simulator enabled")
def test_numba_cuda_without_gpu_is_one_clear_error():
    pytest.importorskip("numba")
    import numba.cuda
    if numba.cuda.is_available():
        pytest.skip("a CUDA GPU is present")
    with pytest.raises(ValueError, match=r"backend 'numba-cuda' needs a CUDA GPU.*NUMBA_ENABLE_CUDASIM=1"):
        rc.get_backend("numba-cuda")


def test_backend_status_reports_every_backend():
    st = rc.backend_status()
    assert set(st) == set(rc.BACKENDS) and st["numpy"] == "ok"


def test_ddpm_step_is_ho_et_al_algorithm_2():
    from refdiff.sde import DDPMSchedule
    s = DDPMSchedule()
    rng = np.random.default_rng(0)
    x, eps, z = (rng.standard_normal((2, 1, 4, 4)) for _ in range(3))
    i = 500
    b, ab, a = s.betas[i], s.alpha_bars[i], s.alphas[i]
    want = (x - b / np.sqrt(1 - ab) * eps) / np.sqrt(a) + 0.1 * z
    np.testing.assert_allclose(RS.ddpm_step(x, eps, z, b, ab, 0.1), want, rtol=1e-13)
    np.testing.assert_allclose(RS.ddpm_step(x, eps, None, b, ab, 0.1), want - 0.1 * z, rtol=1e-13)


def test_em_step_is_the_samplers_update():
    """refdiff.samplers.euler_maruyama: x <- x - reverse_drift dt + g sqrt(dt) z."""
    from refdiff.sde import VP
    sde = VP()
    rng = np.random.default_rng(1)
    x, score, z = (rng.standard_normal((3, 2)) for _ in range(3))
    t, dt = 0.6, 1e-3
    want = x - sde.reverse_drift(x, t, score) * dt + sde.diffusion(t) * np.sqrt(dt) * z
    got = RS.em_step(x, score, z, float(sde.a(np.float64(t))), float(sde.diffusion(t)), dt)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)
