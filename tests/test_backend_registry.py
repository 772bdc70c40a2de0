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


BAD_VERSIONS = [   # (backend, versions, exception, the message must name ...)
    ("numba", 0, ValueError, r"versions=0 is not a kernel version; versions run from 1 .* to 7 \(per op: .*conv2d \[1, 2, 3, 4, 5, 6, 7\]"),
    ("numba", -1, ValueError, r"versions=-1 is not a kernel version"),
    ("numba", 99, ValueError, r"versions=99 is not a kernel version; versions run from 1"),
    ("numba", True, TypeError, r"versions must be None, an int >= 1 or a dict .*got True"),
    ("numba", 1.0, TypeError, r"versions must be .*got 1\.0"),
    ("numba", "fast", TypeError, r"versions must be .*got 'fast'"),
    ("numba", [1, 2], TypeError, r"versions must be .*got \[1, 2\]"),
    ("numba", {"softmax": 1}, ValueError, r"no kernels for op 'softmax'; ops: \["),
    ("numba", {"conv2d_forward": 8}, ValueError, r"'conv2d' has versions \[1, 2, 3, 4, 5, 6, 7\]; got 8"),
    ("numba", {"conv2d": 0}, ValueError, r"'conv2d' has versions \[1, 2, 3, 4, 5, 6, 7\]; got 0"),
    ("numba", {"conv2d": True}, TypeError, r"versions must be .*got \{'conv2d': True\}"),
    ("numba", {"conv2d": 2.0}, TypeError, r"versions must be .*got \{'conv2d': 2\.0\}"),
    ("numba", {1: 2}, TypeError, r"versions must be .*got \{1: 2\}"),
    ("numpy", 2, ValueError, r"backend 'numpy': versions=2 is not a kernel version; versions run from 1 .* to 1"),
    ("numpy", 0, ValueError, r"backend 'numpy': versions=0 is not a kernel version"),
    ("numpy", True, TypeError, r"backend 'numpy': versions must be"),
    ("numpy", {"conv2d": 2}, ValueError, r"backend 'numpy': op 'conv2d' has versions \[1\]; got 2"),
]


@pytest.mark.parametrize("name, versions, exc, match", BAD_VERSIONS, ids=[f"{n}-{v!r}" for n, v, _, _ in BAD_VERSIONS])
def test_bad_versions_are_one_clear_error(name, versions, exc, match):
    """Never a silent clamp: a version no op has, a bool or float, an unknown op each raise,
    naming the op and the versions that exist."""
    if name == "numba":
        pytest.importorskip("numba")
    with pytest.raises(exc, match=match):
        rc.get_backend(name, versions=versions)


def test_good_versions():
    pytest.importorskip("numba")
    be = rc.get_backend("numba", versions={"conv2d_backward": 1})   # a member selects its pair
    assert be.versions["conv2d"] == 1 and be.versions["silu"] == max(be.available_versions["silu"])
    be = rc.get_backend("numba", versions=3)       # each op at 3, or its newest below 3
    assert be.versions["conv2d"] == 3 and be.versions["silu"] == 3 and be.versions["linear"] == 2
    assert be.versions["time_embedding"] == 1
    assert rc.get_backend("numba", versions=np.int64(1)).versions == rc.get_backend("numba", versions=1).versions
    assert set(rc.get_backend("numba", versions=1).versions.values()) == {1}
    assert rc.get_backend("numpy", versions=1).conv2d_forward is REFERENCE.conv2d_forward


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
