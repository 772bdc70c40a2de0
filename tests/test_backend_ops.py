"""Every accelerated backend (refdiff_cuda.BACKENDS but the reference itself) against the NumPy
reference: every op pair and kernel version (hypothesis, refdiff_cuda.testing.check_op), the
sampler steps, Adam, the time embedding, the issue's op list accelerated (no silent
fallback), the golden training run, and the model API (a training step, the samplers)
unchanged. A backend that cannot run here shows as skipped with backend_status()'s reason.

numba-cuda runs on a CUDA GPU, or on the CPU under numba's simulator when
NUMBA_ENABLE_CUDASIM=1 is set before numba.cuda is imported: test_backend_numba_cuda_sim.py
runs this module's numba-cuda cases in a subprocess with the variable set. Under the
simulator every GPU thread is a Python thread, so its PROFILE is small: tiny shapes
(op_case(tiny=True)), 3 derandomised examples, the tiny golden run (2 steps, float64,
version 1), and no sampler or model runs (the golden run covers the model).
Kernel-specific tests (paths taken, SIMD micro-kernels, non-finite inputs) of the numba
backend are in test_backend_numba.py; the cupy backend's version 1 is also tested on the CPU
in test_backend_cupy_reference.py.
"""
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import refdiff_cuda as rc
from refdiff_cuda import PAIRS, REQUIRED
from refdiff_cuda.testing import TOL, assert_agree, check_adam, check_function, check_op, compare_training, op_case
from tests.golden import make_golden as G

NAMES = [n for n in rc.BACKENDS if n != "numpy"]     # "numpy" is the reference they are tested against
STATUS = rc.backend_status()


def _profile(name):
    """How hard `name` is tested here (see the module docstring)."""
    be = rc.get_backend(name)
    sim = bool(getattr(be, "simulator", False))
    golden = [(1, np.float64, True)] if sim else [(v, d, False) for v in (None, 1) for d in (np.float32, np.float64)]
    return SimpleNamespace(sim=sim, tiny=sim, golden=golden, models=not sim,
                           # derandomized under the simulator; elsewhere as the loaded profile says (CI: derandomized)
                           settings=settings(max_examples=3 if sim else 25, deadline=None,
                                             derandomize=sim or settings.default.derandomize,
                                             suppress_health_check=[HealthCheck.too_slow]),
                           marks=[pytest.mark.gpu] if name == "cupy" or (name == "numba-cuda" and not sim) else [])


PROFILE = {n: _profile(n) for n in NAMES if STATUS[n] == "ok"}


def params(n_args, cases=lambda name, be, p: [((), "")]):
    """Parameters (name, *args) for each available backend, cases(name, backend, profile) ->
    [(args, id)]; one skipped parameter, with backend_status()'s reason, per unavailable one."""
    out = []
    for name in NAMES:
        if STATUS[name] != "ok":
            out.append(pytest.param(name, *[None] * n_args, id=name,
                                    marks=pytest.mark.skip(reason=f"{name}: {STATUS[name]}")))
            continue
        be, p = rc.get_backend(name), PROFILE[name]
        out += [pytest.param(name, *args, id=f"{name}-{ident}" if ident else name, marks=p.marks)
                for args, ident in cases(name, be, p)]
    return out


PAIR_OPS = [op for op in PAIRS if len(PAIRS[op]) == 2]


@pytest.mark.parametrize("name, op, version", params(2, lambda n, be, p: [
    ((op, v), f"{op}-v{v}") for op in PAIR_OPS for v in be.available_versions[op]]))
def test_pair_agrees(name, op, version):
    be, p = rc.get_backend(name, versions={op: version}), PROFILE[name]

    @p.settings
    @given(data=st.data(), dtype=st.sampled_from([np.float32, np.float64]))
    def run(data, dtype):
        inputs, kwargs = data.draw(op_case(op, tiny=p.tiny))
        check_op(op, be, inputs, dtype, kwargs)
    run()


@pytest.mark.parametrize("name, op, version", params(2, lambda n, be, p: [
    ((op, v), f"{op}-v{v}") for op in ("ddpm_step", "em_step") for v in be.available_versions[op]]))
def test_sampler_steps_agree(name, op, version):
    be, p = rc.get_backend(name, versions={op: version}), PROFILE[name]
    scalars = (0.02, 0.3, 0.1) if op == "ddpm_step" else (0.7, 1.3, 1e-3)

    @p.settings
    @given(dtype=st.sampled_from([np.float32, np.float64]), B=st.integers(1, 3), D=st.integers(1, 3 if p.tiny else 9),
           noise=st.booleans(), seed=st.integers(0, 99))
    def run(dtype, B, D, noise, seed):
        rng = np.random.default_rng(seed)
        x, e, z = (rng.standard_normal((B, 1, D, D)) for _ in range(3))
        check_function(op, be, [x, e, z if noise else None, *scalars], dtype)
    run()


@pytest.mark.parametrize("name, version", params(1, lambda n, be, p: [
    ((v,), f"v{v}") for v in sorted({1, max(be.available_versions["ddpm_step"])})]))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_single_ops_agree(name, version, dtype):
    """Fixed cases: both sampler steps with and without noise, the time embedding, Adam."""
    be, p = rc.get_backend(name, versions=version), PROFILE[name]
    rng = np.random.default_rng(0)
    x, e, z = (rng.standard_normal((2, 1, 3, 3) if p.tiny else (3, 1, 5, 5)) for _ in range(3))
    for noise in (z, None):
        check_function("ddpm_step", be, [x, e, noise, 0.02, 0.3, 0.1], dtype)
        check_function("em_step", be, [x, e, noise, 0.7, 1.3, 1e-3], dtype)
    check_function("time_embedding", be, [np.array([0.0, 1.0, 1.0, 999.0]), 7], dtype, dict(dtype=dtype))
    check_adam(be, (3, 5) if p.tiny else (3, 5, 7), dtype, steps=3 if p.tiny else 4, weight_decay=0.1)


@pytest.mark.parametrize("name, version, wd", params(2, lambda n, be, p: [] if p.sim else [
    ((v, wd), f"v{v}-wd{wd}") for v in be.available_versions["adam_update"] for wd in (0.0, 0.1)]))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_adam_agrees(name, version, wd, dtype):
    check_adam(rc.get_backend(name, versions={"adam_update": version}), (3, 5, 7), dtype, steps=4, weight_decay=wd)


@pytest.mark.parametrize("name", params(0, lambda n, be, p: [] if p.sim else [((), "")]))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_time_embedding_agrees(name, dtype):
    t = np.array([0.0, 1.0, 1.0, 17.5, 999.0, 1e4])
    for dim in (1, 2, 7, 100):
        check_function("time_embedding", rc.get_backend(name), [t, dim], dtype, dict(dtype=dtype))


@pytest.mark.parametrize("name", params(0))
def test_required_ops_are_accelerated(name):
    be = rc.get_backend(name)
    names = {n for op in REQUIRED for n in PAIRS[op]}
    assert not names & set(be.fallback), names & set(be.fallback)
    for op in REQUIRED:
        assert be.versions[op] == max(be.available_versions[op])
        assert 1 in be.available_versions[op], f"{op} lacks its literal port (version 1)"


UNET_DDPM_ATTENTION = [((2, 192, 7, 7), 1), ((2, 192, 7, 7), 4), ((3, 12, 1, 1), 2)]
UNET_DDPM_UPSAMPLE = [(3, 64, 7, 7), (2, 64, 14, 14)]
# the simulator runs every GPU thread as a Python thread: the same cases, smaller
TINY_ATTENTION, TINY_UPSAMPLE = [((1, 12, 2, 3), 1), ((1, 12, 2, 1), 2), ((2, 6, 1, 1), 2)], [(1, 3, 2, 3)]


@pytest.mark.parametrize("name, version", params(1, lambda n, be, p: [
    ((v,), f"v{v}") for v in be.available_versions["spatial_attention"]]))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_attention_at_unet_ddpm_shapes(name, version, dtype):
    """unet-ddpm's attention (C = 64 at 7 x 7, one and four heads; a 1 x 1 map), on the NCHW
    array and on the channel-major view a backend's 1x1 conv returns; then the 2x upsampling
    of its 7 x 7 and 14 x 14 maps, both layouts."""
    be = rc.get_backend(name, versions={"spatial_attention": version, "upsample_nearest2x": version})
    tiny = PROFILE[name].tiny
    rng = np.random.default_rng(1)
    for shape, heads in TINY_ATTENTION if tiny else UNET_DDPM_ATTENTION:
        qkv = rng.standard_normal(shape)
        for a in (qkv, np.ascontiguousarray(qkv.swapaxes(0, 1)).swapaxes(0, 1)):
            check_op("spatial_attention", be, [a], dtype, dict(heads=heads))
    for shape in TINY_UPSAMPLE if tiny else UNET_DDPM_UPSAMPLE:
        x = rng.standard_normal(shape)
        for a in (x, np.ascontiguousarray(x.swapaxes(0, 1)).swapaxes(0, 1)):
            check_op("upsample_nearest2x", be, [a], dtype)


@pytest.mark.parametrize("name, version", params(1, lambda n, be, p: [
    ((v,), f"v{v}") for v in be.available_versions["dropout"]]))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dropout_same_mask_from_a_seed(name, version, dtype):
    """A fixed seed gives the reference's mask (checked by check_op, which hands every run a
    copy of the generator, and here directly: y is x times 1/(1-p) or 0, bit for bit), on
    NCHW and channel-major inputs; p = 0 draws nothing and returns x itself."""
    be = rc.get_backend(name, versions={"dropout": version})
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 3, 2, 2) if PROFILE[name].tiny else (3, 8, 5, 5)).astype(dtype)
    for a in (x, np.ascontiguousarray(x.swapaxes(0, 1)).swapaxes(0, 1)):
        for p in (0.0, 0.1, 0.5):
            check_op("dropout", be, [a, p, np.random.default_rng(7)], dtype)
            y_ref, _ = rc.get_backend("numpy").dropout_forward(x, p, np.random.default_rng(7))
            g = np.random.default_rng(7)
            xa = be.asarray(a)
            y, cache = be.dropout_forward(xa, p, g)
            np.testing.assert_array_equal(be.to_numpy(y), y_ref)
            if p == 0:
                assert y is xa and cache is None and g.bit_generator.state == np.random.default_rng(7).bit_generator.state
    with pytest.raises(AssertionError, match=r"dropout \[.*\] forward"):   # a mask from another draw is caught
        other = SimpleNamespace(**{**vars(be), "dropout_forward": lambda x, p, g: be.dropout_forward(
            x, p, np.random.default_rng(8))})
        check_op("dropout", other, [x, 0.5, np.random.default_rng(7)], dtype)


@pytest.mark.parametrize("name", params(0, lambda n, be, p: [((), "")] if n == "numba-cuda" else []))
def test_simulator_is_what_runs(name):
    import os
    be = rc.get_backend(name)
    sim = os.environ.get("NUMBA_ENABLE_CUDASIM", "") == "1"
    assert be.simulator == sim
    assert be.container == ("host" if sim else be.container)


@pytest.mark.parametrize("name", params(0, lambda n, be, p: [((), "")] if n == "numba-cuda" else []))
def test_ops_use_the_container_they_are_bound_to(name):
    """numba-cuda keeps no module-level state: each op uses the array container it was bound
    to (numba_cuda.bind_kernels), not the one of another backend built in the process."""
    import numba.cuda
    from refdiff_cuda import numba_cuda
    from refdiff_cuda.numba_cuda import _arrays, functional

    class Counting(_arrays.Arrays):
        uploads = 0

        def dev(self, a, dtype=None):
            Counting.uploads += 1
            return super().dev(a, dtype)

    be = rc.get_backend(name)
    silu = numba_cuda.bind_kernels(Counting(numba.cuda, be.container), functional.KERNELS)["silu"][1][0]
    x = np.linspace(-2.0, 2.0, 6)
    y, _ = silu(x)
    assert Counting.uploads == 1
    assert_agree(be.to_numpy(y), x / (1 + np.exp(-x)), TOL[np.dtype(np.float64)], "silu, bound container")
    be.silu_forward(x)                           # the backend's own container: not the counting one
    assert Counting.uploads == 1


@pytest.mark.parametrize("name, versions, dtype, tiny", params(3, lambda n, be, p: [
    ((v, d, tiny), f"v{v or 'newest'}-{np.dtype(d)}{'-tiny' if tiny else ''}") for v, d, tiny in p.golden]))
def test_reproduces_golden(name, versions, dtype, tiny):
    """The golden training run (tests/golden/, `python -m tests.golden.make_golden`): every
    loss and every gradient of every step."""
    gold = G.load(dtype, tiny)
    if not tiny:
        assert gold["config"] == G.CONFIG and int(gold["version"]) == G.VERSION, \
            "golden file out of date: python -m tests.golden.make_golden"
    steps = len(gold["losses"])
    be = rc.get_backend(name, versions=versions)
    losses, grads = G.train(be, dtype, gold["xt"], gold["t"], gold["eps"], steps, gold["config"])
    compare_training(losses, grads, gold, dtype,
                     f"{name} {'v1' if versions else 'newest'}{' (simulator)' if PROFILE[name].sim else ''}")


CFG = dict(channels=[4, 8], blocks=1, mid_channels=4, emb_dim=8, image_size=6)


@pytest.mark.parametrize("name", params(0, lambda n, be, p: [((), "")] if p.models else []))
def test_unet_trains_unchanged(name):
    """make_model(..., backend=name): same API; a training step agrees with the reference."""
    from refdiff.nn import make_model
    from refdiff.optim import Adam
    rng = np.random.default_rng(0)
    x, t = rng.standard_normal((2, 1, 6, 6)), np.array([0.1, 0.7])
    out = {}
    for backend in ("numpy", name):
        m = make_model("unet", dtype=np.float64, backend=backend, **CFG)
        opt = Adam(m, lr=1e-3)
        m.zero_grad()
        y = m.forward(m.ops.asarray(x), t)
        m.backward(y - m.ops.asarray(x))
        opt.step()
        out[backend] = (m.ops.to_numpy(y), m.ops.to_numpy(m.forward(m.ops.asarray(x), t)))
    for a, b in zip(out[name], out["numpy"]):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-11)   # float64: TOL[float64] x 10 (one Adam step)


@pytest.mark.parametrize("name, sampler", params(1, lambda n, be, p: [
    ((s,), s) for s in ("ancestral", "ancestral-clip", "ddim", "em_vp")] if p.models else []))
def test_samplers_run_unchanged(name, sampler):
    """refdiff.ddpm's samplers on a backend-held UNet (state on its device, its ddpm_step /
    em_step ops) give the reference's images from the same seed."""
    from refdiff import ddpm
    from refdiff.nn import make_model
    from refdiff.sde import DDPMSchedule
    out = {}
    for backend in ("numpy", name):
        m = make_model("unet", dtype=np.float64, backend=backend, seed=5, **CFG)
        rng, shape, sched = np.random.default_rng(3), (3, 1, 6, 6), DDPMSchedule(num_steps=4)
        if sampler.startswith("ancestral"):
            out[backend] = ddpm.ancestral(m, sched, shape, rng, clip=sampler.endswith("clip"))
        elif sampler == "ddim":
            out[backend] = ddpm.ddim(m, sched, shape, rng, steps=2, eta=0.5)
        else:
            out[backend] = ddpm.em_vp(m, shape, rng, steps=4)
    assert isinstance(out[name], np.ndarray)
    assert np.abs(out["numpy"]).max() > 0.1
    assert_agree(out[name], out["numpy"], TOL[np.dtype(np.float64)], f"{sampler} on {name}, 4 steps")
