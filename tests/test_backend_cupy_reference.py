"""The cupy backend's version 1 is the reference run with CuPy as the array module, tested
on the CPU: `build_backend` is given a stand-in for the cupy module whose arrays are NumPy
arrays of a subclass ("device arrays"), whose functions are NumPy's (counted, and returning
device arrays), and which refuses any NumPy function applied to a device array outside it
and any arithmetic mixing device and host arrays (CuPy raises there too). So an op that
builds an array with `np.` instead of its inputs' `xp` raises or returns a host array.

Checked: version 1's functions are the reference's own function objects; the golden tiny
training run on device arrays gives the reference's losses and gradients bit for bit (same
code, same NumPy arithmetic); every result stays a device array; fallbacks run on the host.
"""
import sys
import types

import numpy as np
import pytest

from refdiff.backend import REFERENCE
from refdiff_cuda import PAIRS
from refdiff_cuda.cupy_backend import build_backend
from tests.golden import make_golden as G


class DeviceArray(np.ndarray):
    """A NumPy array standing for a CuPy array."""

    def __array_function__(self, func, types_, args, kwargs):
        if not _INSIDE[0]:
            raise TypeError(f"numpy.{func.__name__} called on a device array: the op must use its xp")
        return super().__array_function__(func, types_, args, kwargs)

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        """Arithmetic mixing device and host arrays is an error, as in CuPy."""
        operands = inputs + tuple(kwargs.get("out", ()))
        if any(type(a) is np.ndarray and a.ndim > 0 for a in operands):
            raise TypeError(f"numpy.{ufunc.__name__} mixes a device array with a host array")
        host = [a.view(np.ndarray) if isinstance(a, DeviceArray) else a for a in inputs]
        out = kwargs.pop("out", None)
        if out is not None:
            kwargs["out"] = tuple(a.view(np.ndarray) if isinstance(a, DeviceArray) else a for a in out)
        r = getattr(ufunc, method)(*host, **kwargs)
        if out is not None:
            return out[0] if len(out) == 1 else out
        return _dev(r)


_INSIDE = [False]


def _dev(r):
    if isinstance(r, np.ndarray) and not isinstance(r, DeviceArray):
        return r.view(DeviceArray)
    if isinstance(r, (list, tuple)):
        return type(r)(_dev(x) for x in r)
    return r


class StandInCupy(types.ModuleType):
    """cupy's interface on NumPy: cupy.X is numpy.X applied with device arrays allowed, results
    made device arrays; asnumpy copies to a plain NumPy array; as_strided has no `writeable`."""

    ndarray = DeviceArray

    def __init__(self):
        super().__init__("cupy")
        self.calls = []
        self.lib = types.SimpleNamespace(stride_tricks=types.SimpleNamespace(as_strided=self._as_strided))

    def _as_strided(self, x, shape=None, strides=None):
        return self._wrap("as_strided", np.lib.stride_tricks.as_strided)(x, shape, strides)

    def _wrap(self, name, f):
        def g(*args, **kwargs):
            self.calls.append(name)
            _INSIDE[0] = True
            try:
                return _dev(f(*args, **kwargs))
            finally:
                _INSIDE[0] = False
        return g

    def __getattr__(self, name):
        v = getattr(np, name)
        return self._wrap(name, v) if callable(v) and not isinstance(v, type) else v

    def asnumpy(self, a):
        return np.array(a).view(np.ndarray)

    def asarray(self, a, dtype=None):
        return self._wrap("asarray", np.array)(a, dtype=dtype, copy=True)


@pytest.fixture
def cp(monkeypatch):
    """The stand-in, installed as `cupy` (where refdiff.nn.array_module looks for it)."""
    stand_in = StandInCupy()
    monkeypatch.setitem(sys.modules, "cupy", stand_in)
    return stand_in


def test_version_1_is_the_reference(cp):
    be = build_backend(cp, versions=1)
    for op, names in PAIRS.items():
        if op == "time_embedding":
            assert be.time_embedding.__wrapped__ is REFERENCE.time_embedding
            continue
        for name in names:
            assert getattr(be, name) is getattr(REFERENCE, name), name
    assert be.available_versions["conv2d"] == [1] and be.versions["conv2d"] == 1


def test_golden_run_on_device_arrays_is_the_reference_bit_for_bit(cp):
    """The tiny golden run (2 steps of a small UNet, float64), every op of the model on the
    stand-in device arrays, against the same run on NumPy arrays."""
    be = build_backend(cp, versions=1)
    gold = G.load(np.float64, tiny=True)
    steps = len(gold["losses"])
    args = (np.float64, gold["xt"], gold["t"], gold["eps"], steps, gold["config"])
    losses, grads = G.train(be, *args)
    ref_losses, ref_grads = G.train("numpy", *args)
    np.testing.assert_array_equal(losses, ref_losses)
    for k in range(steps):
        assert grads[k].keys() == ref_grads[k].keys()
        for name in grads[k]:
            np.testing.assert_array_equal(grads[k][name], ref_grads[k][name], err_msg=f"step {k} {name}")
    for f in ("zeros", "ascontiguousarray", "as_strided", "sqrt", "concatenate", "split", "asarray"):
        assert f in cp.calls, f"the ops never called xp.{f}"


@pytest.mark.parametrize("op", [op for op in PAIRS if len(PAIRS[op]) == 2])
def test_every_pair_keeps_device_arrays(cp, op):
    """Each pair's outputs and gradients are device arrays: no array of the op is made with
    numpy directly (it would be a host array on a GPU)."""
    from refdiff_cuda.testing import op_case
    from hypothesis import given, settings, HealthCheck

    be = build_backend(cp, versions=1)

    @settings(max_examples=5, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
    @given(case=op_case(op, tiny=True))
    def run(case):
        inputs, kwargs = case
        dev = [[be.asarray(a) for a in x] if isinstance(x, list) else
               (be.asarray(x) if isinstance(x, np.ndarray) else x) for x in inputs]
        fwd, bwd = (getattr(be, n) for n in PAIRS[op])
        y, cache = fwd(*dev, **kwargs)
        if op == "mse":
            grads = bwd(cache)
        else:
            assert isinstance(y, DeviceArray), f"{op} forward returned {type(y)}"
            grads = bwd(be.asarray(np.ones(y.shape, y.dtype)), cache)
        for g in (grads if isinstance(grads, (tuple, list)) else [grads]):
            assert g is None or isinstance(g, DeviceArray), f"{op} backward returned {type(g)}"
    run()


def test_fallbacks_run_on_host_copies(cp):
    be = build_backend(cp, versions=1)
    assert "leaky_relu_forward" in be.fallback
    x = np.linspace(-2, 2, 5)
    y, (mask, slope) = be.leaky_relu_forward(be.asarray(x), 0.1)
    assert isinstance(y, DeviceArray) and type(mask) is np.ndarray     # the cache stays on the host
    np.testing.assert_array_equal(cp.asnumpy(y), np.where(x > 0, x, 0.1 * x))
    dx = be.leaky_relu_backward(be.asarray(np.ones(5)), (mask, slope))
    assert isinstance(dx, DeviceArray)
    emb = be.time_embedding(np.array([0.0, 3.0]), 4, dtype=np.float64)
    assert isinstance(emb, DeviceArray)
    np.testing.assert_array_equal(cp.asnumpy(emb), REFERENCE.time_embedding(np.array([0.0, 3.0]), 4, dtype=np.float64))
