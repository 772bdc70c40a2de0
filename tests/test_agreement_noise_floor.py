"""refdiff_cuda.testing's noise floor: a reference tensor that is only rounding noise of its
terms (max|ref| <= 4 u x terms) is compared with that floor, and nothing else is loosened."""
import numpy as np
import pytest

import refdiff_cuda as rc
from refdiff_cuda.testing import TOL, assert_agree, check_op

U32 = np.finfo(np.float32).eps / 2


def test_silu_of_very_negative_inputs_agrees():
    # every input in [-88, -60]: the reference's float32 and float64 silu are -0 (1 + tanh(x/2)
    # cancels), numba's version 3 keeps x e^x ~ -5e-25: both are noise next to u |x|
    pytest.importorskip("numba")
    x = np.random.default_rng(0).uniform(-88, -60, (3, 5))
    for v in rc.get_backend("numba").available_versions["silu"]:
        check_op("silu", rc.get_backend("numba", versions={"silu": v}), [x], np.float32)


def test_noise_sized_reference_rejects_a_signal_sized_result():
    tol, noise = TOL[np.dtype(np.float32)], 4 * U32 * 80.0
    e = np.zeros(6)
    assert_agree(np.full(6, 0.9 * noise), e, tol, "under the floor", noise=noise)
    with pytest.raises(AssertionError, match="noise"):
        assert_agree(np.full(6, 2.1 * noise), e, tol, "above the floor", noise=noise)


def test_floor_plays_no_part_when_the_reference_carries_signal():
    # max|ref| above the floor: the usual atol x max|ref| bound, however large the floor would be
    tol = TOL[np.dtype(np.float32)]
    e = np.array([1.0, -2.0, 0.5])
    noise = 0.5 * np.abs(e).max()
    off = e.copy()
    off[2] += 3 * tol["atol"] * np.abs(e).max()          # past atol x max|ref| + rtol |ref|
    with pytest.raises(AssertionError, match="atol"):
        assert_agree(off, e, tol, "signal", noise=noise)


def test_backend_off_by_more_than_noise_on_a_zero_reference_fails():
    # a backend whose silu adds 1e-3 x (a wrong formula) is not noise where the reference is -0
    pytest.importorskip("numba")
    be = rc.get_backend("numba", versions={"silu": 1})

    class Wrong:
        name, versions = "wrong", {"silu": 0}
        asarray, to_numpy = staticmethod(be.asarray), staticmethod(be.to_numpy)

        @staticmethod
        def silu_forward(x):
            y, cache = be.silu_forward(x)
            return y + 1e-3 * x, cache

        silu_backward = staticmethod(be.silu_backward)

    x = np.random.default_rng(1).uniform(-88, -60, (2, 4))
    with pytest.raises(AssertionError, match="silu .*forward"):
        check_op("silu", Wrong, [x], np.float32)
