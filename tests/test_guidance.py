"""Class conditioning and classifier-free guidance (refdiff.prediction.EpsModel, refdiff.generate):
scale 0 is the unconditional model and scale 1 the conditional one, exactly, for every sampler;
a closed form for other scales; labels reach the right images through chunked and
per-image-stream (mpirun) sampling; label dropout in the loss; bad input.

The fake network (the interface of refdiff.nn.unet_ddpm: forward(x, t, y=None), y in [0, K],
K the null label) is the ORACLE of a one-image data set per label: label k's image IMG[k]
(k = K: the unconditional image). As an x0-network its prediction is IMG[y] whatever x and t
are, so deterministic DDIM and DPM-Solver++ (whose last step returns the x0 prediction) end
exactly on the guided x0 = (1 - W) IMG[K] + W IMG[y] (the conversions are affine: guiding in
x0 or eps space is one thing); as an eps-network it is eps*_y of that image.
Tolerance: 1e-10 as the one-image oracle tests (tests/test_prediction.py: rounding only).
"""
import numpy as np
import pytest

from refdiff import ddpm, prediction as P
from refdiff.backend import REFERENCE
from refdiff.generate import generate
from refdiff.sde import DDPMSchedule

SCHED = DDPMSchedule(num_steps=100, beta_end=0.2)      # 100 steps to the same noise level as 1000
K = 3
IMG = np.random.default_rng(5).uniform(-0.5, 0.5, (K + 1, 1, 4, 4))     # IMG[K]: the null label's image
META = {"ddpm_schedule": SCHED.config(), "image_shape": [1, 4, 4]}
SAMPLERS = [dict(sampler="ddpm"), dict(sampler="ddim", steps=10, eta=0.5), dict(sampler="em", steps=50),
            dict(sampler="dpm2m", steps=8), dict(sampler="edm", steps=6), dict(sampler="rk45"),
            dict(sampler="heun-sde", steps=20)]


class CondNet:
    """Class-conditional oracle network (see the module docstring); records the labels it gets."""

    name, kind, dtype, ops = "cond-oracle", "eps", np.dtype(np.float64), REFERENCE
    input_shape = (1, 4, 4)

    def __init__(self, pred="x0", num_classes=K):
        self.pred, self.config, self.seen = pred, {"num_classes": num_classes}, []

    def forward(self, x, t, y=None, rng=None):
        y = np.full(x.shape[0], self.config["num_classes"]) if y is None else np.asarray(y)
        self.seen.append(y.copy())
        x0 = IMG[y]
        abar = P.abar_at(SCHED, t)
        return P.target_of(self.pred, x0, P.eps_from_x0(x, x0, abar), abar)

    def backward(self, dy):
        self.dy = dy


class FixedLabel:
    """An unconditional model: `net` always given the labels y (independent of EpsModel)."""

    kind, name, dtype, ops, input_shape, config = "eps", "fixed", np.dtype(np.float64), REFERENCE, (1, 4, 4), {}

    def __init__(self, net, y, pred):
        self.net, self.y, self.pred = net, np.asarray(y), pred

    def forward(self, x, t):
        return P.to_eps(self.pred, x, self.net.forward(x, t, y=self.y[:x.shape[0]]), P.abar_at(SCHED, t))


def _gen(model, n, seed=0, **kw):
    args = dict(kw)
    labels, guidance = args.pop("labels", None), args.pop("guidance", None)
    return generate(model, dict(META, prediction=getattr(model, "pred", "eps")), n, np.random.default_rng(seed),
                    labels=labels, guidance=guidance, **args)[0]


@pytest.mark.parametrize("pred", ["eps", "v"])
def test_scale_0_is_the_unconditional_model_and_1_the_conditional(pred):
    net = CondNet(pred)
    meta = dict(META, prediction=pred)
    labels = np.array([2, 0, 1, 2])
    for args in SAMPLERS:
        uncond = generate(P.as_eps(net, meta), meta, 4, np.random.default_rng(1), **args)[0]
        w0 = generate(P.as_eps(net, meta), meta, 4, np.random.default_rng(1), labels=labels, guidance=0.0, **args)[0]
        assert np.array_equal(w0, uncond), args
        cond = generate(FixedLabel(net, labels, pred), meta, 4, np.random.default_rng(1), **args)[0]
        w1 = generate(P.as_eps(net, meta), meta, 4, np.random.default_rng(1), labels=labels, guidance=1.0, **args)[0]
        assert np.array_equal(w1, cond), args
        default = generate(P.as_eps(net, meta), meta, 4, np.random.default_rng(1), labels=labels, **args)[0]
        assert np.array_equal(default, cond), args                      # no --guidance: the conditional model
        assert not np.array_equal(w1, w0), args                          # and the test can fail


@pytest.mark.parametrize("w", [0.0, 1.0, 2.5])
def test_guided_x0_in_closed_form(w):
    labels = np.array([0, 1, 2, 1])
    want = (1 - w) * IMG[K] + w * IMG[labels]
    from refdiff.solvers import sample_from_checkpoint
    model = P.as_eps(CondNet("x0"), dict(META, prediction="x0"), labels, w)
    out = ddpm.sample_from_checkpoint(model, META, 4, np.random.default_rng(0), sampler="ddim", steps=10)
    np.testing.assert_allclose(out, want, rtol=0, atol=1e-10, err_msg="ddim")
    out = sample_from_checkpoint(model, META, 4, np.random.default_rng(0), sampler="dpm2m", steps=5)[0]
    np.testing.assert_allclose(out, want, rtol=0, atol=1e-10, err_msg="dpm2m")


def test_guidance_formula_at_one_call():
    net, labels = CondNet("eps"), np.array([1, 2])
    x, t = np.random.default_rng(0).standard_normal((2, 1, 4, 4)), np.full(2, 0.4)
    u, c = net.forward(x, t), net.forward(x, t, y=labels)
    g = P.as_eps(net, META, labels, 3.0).forward(x, t)
    np.testing.assert_allclose(g, u + 3.0 * (c - u), rtol=0, atol=1e-12)


def test_labels_follow_the_images_through_chunks():
    """n = 7 images of classes 0, 1, 2 in batches of 3: image j is IMG[label j] (DDIM with the
    x0 oracle ends on the prediction), and a stochastic sampler in chunks with one class equals
    the same chunked sampler on the fixed-label model, draw for draw."""
    labels = P.class_labels([0, 1, 2], 7)
    assert labels.tolist() == [0, 0, 0, 1, 1, 2, 2]
    net = CondNet("x0")
    x = _gen(P.as_eps(net, dict(META, prediction="x0")), 7, labels=labels, sampler="ddim", steps=10, batch=3)
    np.testing.assert_allclose(x, np.clip(IMG[labels], -1, 1), rtol=0, atol=1e-6)     # float32 output
    x2, traj, _ = generate(P.as_eps(net, dict(META, prediction="x0")), dict(META, prediction="x0"), 7,
                           np.random.default_rng(0), gif=True, frames=4, labels=labels, sampler="ddim", steps=10,
                           batch=3)
    assert np.array_equal(x2, x) and traj.shape == (4, 7, 1, 4, 4)      # the GIF's frames follow the chunks
    np.testing.assert_allclose(traj[-1], x, rtol=0, atol=1e-6)
    same = np.full(5, 2)
    a = _gen(P.as_eps(net, dict(META, prediction="x0")), 5, labels=same, sampler="ddpm", batch=2)
    b = _gen(FixedLabel(net, same, "x0"), 5, sampler="ddpm", batch=2)
    assert np.array_equal(a, b)


class _TwoRanks:
    """Rank `rank` of a 2-process communicator, gathering nothing (each rank's rows returned)."""

    size, is_root = 2, False

    def __init__(self, rank):
        self.rank = rank

    def gather_rows(self, a, counts, what=""):
        return a


def test_labels_under_mpirun_per_image_streams():
    from refdiff.distributed import SingleProcess, sample_split, share_bounds
    from refdiff.generate import SampleConfig, _split_draw

    net = CondNet("x0")
    model, meta = P.as_eps(net, dict(META, prediction="x0")), dict(META, prediction="x0")
    cfg = SampleConfig(checkpoint="-", n=9, classes=[2, 0, 1], guidance=1.0,
                       sampler_args=dict(sampler="ddim", steps=5, batch=2))
    labels = P.class_labels(cfg.classes, cfg.n)
    x = sample_split(SingleProcess(), _split_draw(model, meta, cfg, labels, SingleProcess()), cfg.n, 0, batch=2)
    np.testing.assert_allclose(x, IMG[labels], rtol=0, atol=1e-6)
    for rank in (0, 1):
        comm = _TwoRanks(rank)
        lo, hi = share_bounds(cfg.n, rank, 2)
        part = sample_split(comm, _split_draw(model, meta, cfg, labels, comm), cfg.n, 0, batch=2)
        np.testing.assert_allclose(part, IMG[labels[lo:hi]], rtol=0, atol=1e-6)


def test_sample_to_dir_writes_labels(tmp_path, monkeypatch):
    import refdiff.generate as G
    from refdiff.generate import SampleConfig, sample_to_dir

    net = CondNet("v")
    meta = dict(META, prediction="v")
    monkeypatch.setattr(G, "load_generator", lambda *a, **k: (P.as_eps(net, meta), meta,
                                                              dict(model=net.name, kind="eps")))
    cfg = SampleConfig(checkpoint="-", n=6, classes=[1, 2], guidance=2.0,
                       sampler_args=dict(sampler="ddim", steps=5))
    info = sample_to_dir(cfg, str(tmp_path))
    labels = np.load(tmp_path / "labels.npy")
    assert labels.dtype == np.int64 and labels.tolist() == [1, 1, 1, 2, 2, 2]
    assert info["classes"] == [1, 2] and info["guidance"] == 2.0
    assert np.load(tmp_path / "samples.npy").shape == (6, 1, 4, 4)
    sample_to_dir(SampleConfig(checkpoint="-", n=2, sampler_args=dict(sampler="ddim", steps=5)), str(tmp_path))
    assert not (tmp_path / "labels.npy").exists()                  # not these images' classes any more


# --- label dropout in the loss -------------------------------------------------------------------------------------
def test_label_dropout_draws_after_the_noise():
    """The loss hands the network its labels, each replaced by the null label K where the
    uniform drawn after i and eps is below P (the draws of refdiff.ddpm.ddpm_loss's docstring)."""
    net, B, p = CondNet("eps"), 2000, 0.25
    x0, y = np.zeros((B, 1, 4, 4)), np.random.default_rng(1).integers(0, K, B)
    ddpm.ddpm_loss(net, SCHED, x0, np.random.default_rng(7), y=y, label_dropout=p)
    rng = np.random.default_rng(7)
    rng.integers(0, SCHED.num_steps, size=B)
    rng.standard_normal(x0.shape)
    want = np.where(rng.random(B) < p, K, y)
    assert np.array_equal(net.seen[-1], want)
    assert abs(np.mean(want == K) - p) < 5 * np.sqrt(p * (1 - p) / B)      # 5 standard errors
    ddpm.ddpm_loss(net, SCHED, x0, np.random.default_rng(7), y=y)          # no dropout: the labels as given
    assert np.array_equal(net.seen[-1], y)


@pytest.mark.parametrize("call,match", [
    (lambda: ddpm.ddpm_loss(CondNet(num_classes=0), SCHED, np.zeros((2, 1, 4, 4)), np.random.default_rng(0),
                            label_dropout=0.1), "label_dropout.*unconditional"),
    (lambda: ddpm.ddpm_loss(CondNet(), SCHED, np.zeros((2, 1, 4, 4)), np.random.default_rng(0), y=np.array([0, 1]),
                            label_dropout=1.0), "label_dropout"),
    (lambda: ddpm.ddpm_loss(CondNet(), SCHED, np.zeros((2, 1, 4, 4)), np.random.default_rng(0), y=np.array([0, 1]),
                            label_dropout=-0.1), "label_dropout"),
    (lambda: ddpm.ddpm_loss(CondNet(), SCHED, np.zeros((2, 1, 4, 4)), np.random.default_rng(0)), "needs labels"),
    (lambda: ddpm.ddpm_loss(CondNet(), SCHED, np.zeros((2, 1, 4, 4)), np.random.default_rng(0), y=np.array([0, 3])),
     r"outside the trained classes \[0, 2\]"),
    (lambda: P.as_eps(CondNet(num_classes=0), META, np.array([0]), 2.0), "--class needs a class-conditional"),
    (lambda: P.as_eps(CondNet(), META, np.array([3]), 2.0), r"--class 3 is outside the trained classes \[0, 2\]"),
    (lambda: P.as_eps(CondNet(), META, np.array([-1]), 2.0), r"--class -1 is outside"),
    (lambda: P.as_eps(CondNet(), META, None, 2.0), "--guidance needs --class"),
    (lambda: P.as_eps(CondNet(), META, np.array([0]), -1.0), "guidance must be"),
    (lambda: P.as_eps(CondNet(), META, np.array([0]), float("nan")), "guidance must be"),
    (lambda: _gen(P.as_eps(CondNet(), META), 2, guidance=2.0, sampler="ddim", steps=2), "--guidance needs --class"),
    (lambda: _gen(P.as_eps(CondNet(), META), 2, labels=np.array([0]), sampler="ddim", steps=2), "one class per image"),
    (lambda: P.class_labels([0, 1, 2], 2), "fewer than the 3 classes"),
])
def test_bad_conditioning_is_refused(call, match):
    with pytest.raises(ValueError, match=match):
        call()
