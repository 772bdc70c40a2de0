"""The fused pairs (refdiff/nn/fused.py) and the models' inference forward (predict).

- Every version of the numba backend's conv2d_silu and group_norm_conv2d agrees with the
  reference pair (refdiff_cuda.testing.check_op, hypothesis shapes and values; float32 and
  float64), at unet-seed's and unet-ddpm's layer shapes too (version 2's own kernel).
- predict equals forward: bit for bit on the reference (the fused pairs are the very same
  op calls), and on numba within the float32 tolerance check_op uses: the float32 paths are
  compared with the float64 forward, with the slack of 4x the float32 forward's own error.
- The samplers call predict (refdiff.nn.base.predictor), not forward.
- conv_transpose2d version 4 (polyphase: the upsampling of predict, and of training) agrees.

check_op looks pairs up in refdiff_cuda.PAIRS and the reference in its REF namespace; the
fused pairs are not among the ops every backend must carry, so the fixture registers them
there for these tests only.
"""
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import refdiff_cuda as rc
import refdiff_cuda.testing as testing
from refdiff.nn import fused as ref_fused
from refdiff.nn import make_model
from refdiff.nn.base import predictor
from refdiff_cuda.testing import TOL, assert_agree, check_op, op_case

pytestmark = pytest.mark.skipif(rc.backend_status()["numba"] != "ok", reason="numba backend unavailable")
SETTINGS = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture
def fused_registered(monkeypatch):
    for op, names in ref_fused.FUSED_PAIRS.items():
        monkeypatch.setitem(rc.PAIRS, op, names)
        for name in names:
            monkeypatch.setattr(testing.REF, name, getattr(ref_fused, name), raising=False)


@st.composite
def gn_conv_case(draw):
    """group_norm_conv2d inputs: op_case's conv2d shapes and values, op_case's group norm
    parameters (|mean| / std <= 10, see its note) on the conv's input channels, and the flags."""
    (x, w, b), kw = draw(op_case("conv2d"))
    C = x.shape[1]
    G = draw(st.sampled_from([g for g in range(1, C + 1) if C % g == 0]))
    # as op_case's group norm: a group of n <= 2 values normalises to +-1 (or 0) whatever x is, so
    # dx is exactly 0 and both sides are rounding noise; keep n >= 3
    if (C // G) * x.shape[2] * x.shape[3] < 3:
        G = 1
    assume(C * x.shape[2] * x.shape[3] >= 3)
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 31)))
    x = (rng.standard_normal(x.shape) + draw(st.sampled_from([0.0, 1.0, 10.0]))) * draw(st.sampled_from([1e-3, 1.0, 1e3]))
    # a shift of a group of one channel is removed exactly by the norm: its gradient is 0 and both
    # sides rounding noise (as enc.0's time vector in the golden test); shift groups of >= 2 channels
    shift = None
    if C // G >= 2 and draw(st.booleans()):
        shift = rng.standard_normal((x.shape[0], C)) * np.abs(x).max()
    gamma, beta = 1 + 0.5 * rng.standard_normal(C), rng.standard_normal(C)
    flags = dict(silu_in=draw(st.booleans()), silu_out=draw(st.booleans()))
    return [x, G, gamma, beta, w, b, shift], dict(kw, **flags)


@pytest.mark.parametrize("version", [1, 2, 3])
def test_conv2d_silu_agrees(fused_registered, version):
    be = rc.get_backend("numba", versions={"conv2d_silu": version})

    @SETTINGS
    @given(case=op_case("conv2d"), dtype=st.sampled_from([np.float32, np.float64]))
    def run(case, dtype):
        inputs, kwargs = case
        check_op("conv2d_silu", be, inputs, dtype, kwargs)
    run()


@pytest.mark.parametrize("version", [1, 2, 3])
def test_group_norm_conv2d_agrees(fused_registered, version):
    be = rc.get_backend("numba", versions={"group_norm_conv2d": version})

    @SETTINGS
    @given(case=gn_conv_case(), dtype=st.sampled_from([np.float32, np.float64]))
    def run(case, dtype):
        inputs, kwargs = case
        check_op("group_norm_conv2d", be, inputs, dtype, kwargs)
    run()


# the networks' own layers, which versions 2 and 3's kernel takes (hypothesis' small images mostly do not):
# (B, Cin, Cout, size, groups); 12 channels and more run as several blocks of the micro-kernel
LAYERS = [(3, 1, 10, 28, 1), (2, 10, 10, 28, 5), (2, 20, 10, 28, 5), (2, 40, 20, 14, 8), (2, 32, 64, 14, 8),
          (2, 80, 80, 7, 8), (2, 64, 3, 28, 8),
          (3, 80, 80, 3, 8), (2, 160, 80, 3, 8), (2, 40, 80, 1, 8),       # version 3's dense product
          (40, 16, 24, 3, 4)]                                              # ... with a batch past 32 (two vectors)


@pytest.mark.parametrize("version", [2, 3])
@pytest.mark.parametrize("B, cin, cout, size, groups", LAYERS)
def test_fused_pairs_at_network_shapes(fused_registered, B, cin, cout, size, groups, version):
    be = rc.get_backend("numba", versions={"conv2d_silu": version, "group_norm_conv2d": version})
    rng = np.random.default_rng([cin, cout, size])
    x = rng.standard_normal((B, cin, size, size)) + 1.0
    w = rng.standard_normal((cout, cin, 3, 3)) / np.sqrt(9 * cin)
    b = rng.standard_normal(cout)
    shift = rng.standard_normal((B, cin)) if cin // groups >= 2 else None      # see gn_conv_case
    gamma, beta = 1 + 0.5 * rng.standard_normal(cin), rng.standard_normal(cin)
    check_op("conv2d_silu", be, [x, w, b], np.float32, dict(stride=1, padding=1))
    for silu_in, silu_out, sh in ((False, True, shift), (True, False, None), (True, True, shift)):
        check_op("group_norm_conv2d", be, [x, groups, gamma, beta, w, b, sh], np.float32,
                 dict(stride=1, padding=1, silu_in=silu_in, silu_out=silu_out))


def _model(name, backend, dtype, **overrides):
    m = make_model(name, backend=backend, dtype=dtype, **overrides)
    # unet-ddpm starts with zeroed last convs (each block the identity): perturb every weight so that
    # every path of the network carries signal
    rng = np.random.default_rng(5)
    m.load_state({k: v + 0.05 * rng.standard_normal(v.shape) for k, v in m.state().items()})
    return m


MODELS = [("unet-seed", {}), ("unet-seed-skip", {}), ("unet-ddpm", {}),
          ("unet-ddpm", dict(num_classes=3, channels=(16, 32), attention=(1,), heads=2)),
          ("unet-ddpm", dict(channels=(4, 8), attention=(), max_groups=8))]     # 4 and 8 groups: stages differ
MODEL_IDS = ["unet-seed", "unet-seed-skip", "unet-ddpm", "unet-ddpm-cond", "unet-ddpm-4-8"]


@pytest.mark.parametrize("name, overrides", MODELS, ids=MODEL_IDS)
def test_predict_is_forward_on_the_reference(name, overrides):
    m = _model(name, None, np.float32, **overrides)
    rng = np.random.default_rng(1)
    x, t = rng.standard_normal((2, 1, 28, 28)), rng.uniform(0.01, 1.0, 2)
    kw = dict(y=np.array([0, 3])) if overrides.get("num_classes") else {}
    np.testing.assert_array_equal(m.predict(x, t, **kw), m.forward(x, t, **kw))


@pytest.mark.parametrize("name, overrides", MODELS, ids=MODEL_IDS)
def test_predict_is_forward_on_numba(name, overrides):
    rng = np.random.default_rng(2)
    x, t = rng.standard_normal((3, 1, 28, 28)), rng.uniform(0.01, 1.0, 3)
    kw = dict(y=np.array([0, 3, 1])) if overrides.get("num_classes") else {}
    m64 = _model(name, "numba", np.float64, **overrides)
    exact = m64.forward(x, t, **kw)
    assert_agree(m64.predict(x, t, **kw), exact, TOL[np.dtype(np.float64)], f"{name} predict float64")
    m32 = _model(name, "numba", np.float32, **overrides)
    own = 4 * float(np.abs(m32.forward(x, t, **kw) - exact).max())      # the training forward's own error, x4
    assert_agree(m32.predict(x, t, **kw), exact, TOL[np.dtype(np.float32)], f"{name} predict float32", slack=own)


def test_samplers_call_predict():
    from refdiff import ddpm
    from refdiff.sde import DDPMSchedule

    m = make_model("unet-small", backend="numba")
    calls = []
    m.predict = lambda x, t, _p=m.predict: calls.append(1) or _p(x, t)
    m.forward = lambda *a, **k: pytest.fail("a sampler called forward, which keeps a backward's caches")
    assert predictor(m) == m.predict
    x = ddpm.ancestral(m, DDPMSchedule(num_steps=3), (2, 1, 28, 28), np.random.default_rng(0))
    assert len(calls) == 3 and np.isfinite(x).all()
    ddpm.ddim(m, DDPMSchedule(num_steps=10), (2, 1, 28, 28), np.random.default_rng(0), steps=2)
    assert len(calls) == 5


def test_conv_transpose2d_v4_agrees():
    """conv_transpose2d version 4 (polyphase, the inference forward's and training's upsampling)."""
    be = rc.get_backend("numba", versions={"conv_transpose2d": 4})

    @SETTINGS
    @given(case=op_case("conv_transpose2d"), dtype=st.sampled_from([np.float32, np.float64]))
    def run(case, dtype):
        inputs, kwargs = case
        check_op("conv_transpose2d", be, inputs, dtype, kwargs)
    run()
    rng = np.random.default_rng(3)
    for cin, size in ((10, 14), (20, 7), (40, 3), (80, 1)):          # unet-seed's 4 x 4 stride-2 upsamples
        x, w, b = rng.standard_normal((2, cin, size, size)), rng.standard_normal((cin, cin, 4, 4)), rng.standard_normal(cin)
        check_op("conv_transpose2d", be, [x, w, b], np.float32, dict(stride=2, padding=1))


def test_dense_matrices_follow_the_weights_in_place(monkeypatch):
    """Version 3 keeps the dense matrix of a tiny-image convolution per weight array
    (fused_v3._dense_matrix); an optimizer changes weights in place, and the next call must
    use the new values. The cache stays within its byte budget."""
    from refdiff_cuda.numba_cpu import fused_v3
    be = rc.get_backend("numba", versions={"conv2d_silu": 3, "group_norm_conv2d": 3})
    rng = np.random.default_rng(4)
    x = rng.standard_normal((5, 8, 3, 3)).astype(np.float32)
    w, b = rng.standard_normal((6, 8, 3, 3)).astype(np.float32), rng.standard_normal(6).astype(np.float32)
    monkeypatch.setattr(fused_v3, "_DENSE", {})
    y1 = be.conv2d_silu_forward(x, w, b, 1, 1)[0]
    assert len(fused_v3._DENSE) == 1                      # the dense path ran and kept its matrix
    w[2, 3, 1, 0] += 1.0                                  # in place: the same array object
    y2 = be.conv2d_silu_forward(x, w, b, 1, 1)[0]
    np.testing.assert_array_equal(y2, be.conv2d_silu_forward(x, w.copy(), b, 1, 1)[0])
    assert not np.array_equal(y1, y2)
    g, be_ = np.ones(8, np.float32), np.zeros(8, np.float32)
    z1 = be.group_norm_conv2d_forward(x, 2, g, be_, w, b, None, 1, 1, True, True)[0]
    w[0, 0, 0, 0] -= 2.0
    z2 = be.group_norm_conv2d_forward(x, 2, g, be_, w, b, None, 1, 1, True, True)[0]
    np.testing.assert_array_equal(z2, be.group_norm_conv2d_forward(x, 2, g, be_, w.copy(), b, None, 1, 1, True,
                                                                   True)[0])
    assert not np.array_equal(z1, z2)
    kept = fused_v3._dense_matrix(w, 3, 3, 3, 3, 1, 1)
    assert fused_v3._dense_matrix(w, 3, 3, 3, 3, 1, 1) is kept              # unchanged weights: not rebuilt
    monkeypatch.setattr(fused_v3, "_DENSE_BYTES", 3 * (54 * 72 + 432) * 4)   # three 6 x 8 matrices at 3 x 3, copies
    ws = [rng.standard_normal((6, 8, 3, 3)).astype(np.float32) for _ in range(5)]
    for wi in ws:
        be.conv2d_silu_forward(x, wi, b, 1, 1)
    assert sum(v[0].nbytes + v[1].nbytes for v in fused_v3._DENSE.values()) <= fused_v3._DENSE_BYTES
    assert len(fused_v3._DENSE) == 3 and [k[0] for k in fused_v3._DENSE][-1] == id(ws[-1])   # the newest kept


def test_version_3_is_version_2_on_its_frame_with_buffers_reused():
    """On version 2's frame (stride 1, images larger than the kernel) version 3 computes the same
    terms in the same order, one sample at a time: bit for bit version 2's output. One thread and 5
    samples, so each thread's padded planes and output rows are reused (padding must stay 0)."""
    import numba
    rng = np.random.default_rng(7)
    x = (rng.standard_normal((5, 16, 9, 12)) + 1.0).astype(np.float32)
    w, b = (rng.standard_normal((13, 16, 3, 3)) / 12).astype(np.float32), rng.standard_normal(13).astype(np.float32)
    g, be_, sh = (1 + 0.5 * rng.standard_normal(16)).astype(np.float32), rng.standard_normal(16).astype(np.float32), \
        rng.standard_normal((5, 16)).astype(np.float32)
    v2 = rc.get_backend("numba", versions={"conv2d_silu": 2, "group_norm_conv2d": 2})
    v3 = rc.get_backend("numba", versions={"conv2d_silu": 3, "group_norm_conv2d": 3})
    old = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        for pad in (1, 2):
            np.testing.assert_array_equal(v3.conv2d_silu_forward(x, w, b, 1, pad)[0],
                                          v2.conv2d_silu_forward(x, w, b, 1, pad)[0])
            for silu_out, shift in ((True, sh), (False, None)):       # silu_in on: its whole-vector run at n % 16 = 0
                args = (x, 4, g, be_, w, b, shift, 1, pad, True, silu_out)
                np.testing.assert_array_equal(v3.group_norm_conv2d_forward(*args)[0],
                                              v2.group_norm_conv2d_forward(*args)[0])
    finally:
        numba.set_num_threads(old)


@pytest.mark.parametrize("version", [1, 2, 3])
@pytest.mark.parametrize("shape", [(2, 3, 2, 2), (2, 3, 2, 40)], ids=["tiny", "wide"])
def test_a_kernel_larger_than_the_padded_input_is_the_references_error(version, shape):
    """A 3 x 3 kernel over 2 rows with no padding: the reference's ValueError, not a frame
    with no output rows (which would let the micro-kernel write past its buffer)."""
    be = rc.get_backend("numba", versions={"conv2d_silu": version, "group_norm_conv2d": version})
    x, w = np.ones(shape, np.float32), np.ones((4, 3, 3, 3), np.float32)
    with pytest.raises(ValueError, match="kernel 3 larger than the padded input 2"):
        ref_fused.conv2d_silu_forward(x, w, None, 1, 0)
    with pytest.raises(ValueError, match="kernel 3 larger than the padded input 2"):
        be.conv2d_silu_forward(x, w, None, 1, 0)
    with pytest.raises(ValueError, match="kernel 3 larger than the padded input 2"):
        be.group_norm_conv2d_forward(x, 3, np.ones(3, np.float32), np.zeros(3, np.float32), w, None, None, 1, 0)
