"""refdiff.likelihood's drivers checked by value: image_bits_per_dim is dequantise-then-solve
per batch with every option passed through (against the loop written out over log_likelihood),
and likelihood_to_dir (what `refdiff likelihood` runs) writes the mean, standard error, NFE and
route of exactly those images, in one process and through a communicator, and refuses what it
must (n beyond the split, more ranks than solves) and nothing else."""
import dataclasses
import json
import math
import types

import numpy as np
import pytest

from refdiff import likelihood as L
from refdiff.distributed import SingleProcess
from refdiff.nn.mlp import ScoreMLP
from refdiff.solvers import continuous_sde

# every option away from its default, so an option that is dropped on the way changes the result
OPTIONS = dict(divergence="hutchinson", probes=2, probe="gaussian", rtol=1e-3, atol=1e-3, t_min=1e-3, route="jvp")


def _by_hand(model, meta, pixels, seed, batch, **kw):
    """image_bits_per_dim written out: one rng dequantises all images, then draws each batch's probes."""
    sde = continuous_sde(meta, "test")
    sf = L.model_score(model, sde)
    rng = np.random.default_rng(seed)
    x = L.dequantize(pixels, rng)
    bpd, nfe = [], []
    for s in range(0, len(x), batch):
        logp, n = L.log_likelihood(sde, sf, x[s:s + batch], rng, **kw)
        bpd.append(L.bits_per_dim(logp, x.shape[1]))
        nfe.append(n)
    return np.concatenate(bpd), nfe


@pytest.mark.parametrize("kw", [OPTIONS, dict(divergence="exact", rtol=2e-3, atol=2e-3, t_min=1e-2)],
                         ids=["hutchinson", "exact"])
def test_image_bits_per_dim_is_the_loop_over_batches(kw):
    model = ScoreMLP(dim=4, widths=(8,), dtype=np.float64, seed=3)
    pixels = np.random.default_rng(0).integers(0, 256, size=(5, 4))
    logs = []
    res = L.image_bits_per_dim(model, {}, pixels, np.random.default_rng(1), batch=2, log=logs.append, **kw)
    bpd, nfe = _by_hand(model, {}, pixels, 1, 2, **kw)
    np.testing.assert_array_equal(res["bpd"], bpd)
    assert res["nfe"] == nfe and len(nfe) == 3
    assert res["route"] == kw.get("route", "vjp")          # "auto" is the VJP for a model's score
    assert logs[0].startswith("likelihood 2/5 images: bits/dim ") and logs[-1].startswith("likelihood 5/5 images")
    assert logs[-1] == f"likelihood 5/5 images: bits/dim {bpd.mean():.4f} (NFE {nfe[-1]})"


def test_image_bits_per_dim_defaults(monkeypatch):
    """Defaults: 100 images per solve, Hutchinson with one Rademacher probe, RK45 at 1e-5, t_min 1e-5,
    the VJP route: the options each solve (log_likelihood, recorded here) is given."""
    model = ScoreMLP(dim=4, widths=(8,), dtype=np.float64, seed=3)
    pixels = np.random.default_rng(2).integers(0, 256, size=(101, 4))
    calls = []

    def record(sde, sf, x, rng, **kw):
        calls.append((x, kw))
        return -x.sum(axis=1), 10 + len(calls)
    monkeypatch.setattr(L, "log_likelihood", record)
    res = L.image_bits_per_dim(model, {}, pixels, np.random.default_rng(4))
    x = L.dequantize(pixels, np.random.default_rng(4))
    defaults = dict(divergence="hutchinson", probes=1, probe="rademacher", rtol=1e-5, atol=1e-5, t_min=1e-5,
                    route="vjp")
    assert [len(c[0]) for c in calls] == [100, 1] and all(c[1] == defaults for c in calls)
    np.testing.assert_array_equal(np.concatenate([c[0] for c in calls]), x)
    np.testing.assert_array_equal(res["bpd"], L.bits_per_dim(-x.sum(axis=1), 4))
    assert res["nfe"] == [11, 12] and res["route"] == "vjp"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tests.tiny_eps_checkpoint import make
    path, _ = make(tmp_path_factory.mktemp("tiny"))
    return path


@pytest.fixture
def three_images(monkeypatch):
    """load_images replaced by 3 known images (recording what it was asked for)."""
    import refdiff.data.images as images
    x = np.random.default_rng(9).integers(0, 256, size=(3, 1, 28, 28)) / 127.5 - 1.0
    asked = []

    def fake(source="mnist5k", split="train"):
        asked.append((source, split))
        return x.astype(np.float32), np.zeros(3, np.int64)
    monkeypatch.setattr(images, "load_images", fake)
    return x, asked


def _expected(path, x, cfg, comm=None):
    from refdiff.generate import load_generator
    model, meta, _ = load_generator(path, want="eps", use_ema=True, backend="numpy")
    pixels = np.round((x[:cfg.n] + 1.0) * 127.5).astype(np.int64)
    kw = dict(batch=cfg.batch, **OPTIONS)
    if comm is None:
        return L.image_bits_per_dim(model, meta, pixels, np.random.default_rng(cfg.seed), **kw)
    return L.split_image_bits_per_dim(comm, model, meta, pixels, cfg.seed, **kw)


@pytest.mark.parametrize("comm", [None, SingleProcess()], ids=["one process", "communicator"])
def test_likelihood_to_dir_writes_the_bits_per_dim_of_those_images(tmp_path, tiny, three_images, comm):
    x, asked = three_images
    cfg = L.LikelihoodConfig(checkpoint=tiny, n=3, batch=2, seed=7, **OPTIONS)
    logs = []
    m = L.likelihood_to_dir(cfg, str(tmp_path / "lik"), log=logs.append, comm=comm)
    assert asked == [("mnist5k", "heldout")]
    want = _expected(tiny, x, cfg, comm)
    bpd = want["bpd"]
    assert m["bits_per_dim_mean"] == float(bpd.mean())
    assert m["bits_per_dim_se"] == pytest.approx(float(bpd.std(ddof=1) / math.sqrt(3)), rel=1e-12)
    assert m["nfe_per_batch"] == want["nfe"] and m["nfe_mean"] == float(np.mean(want["nfe"]))
    assert m["route"] == "jvp" and m["config"] == dataclasses.asdict(cfg)
    assert 0 < m["seconds"] < 600
    assert m["convention"].startswith("uniform dequantisation (p + u) / 256 onto [-1, 1); bpd = -logp / (D ln 2) + 7")
    if comm is None:
        assert "ranks" not in m and any(line.startswith("likelihood 3/3 images") for line in logs)
    else:
        assert m["ranks"] == 1 and m["streams"] == "per image: default_rng([seed, k])"
    assert json.load(open(tmp_path / "lik" / "metrics.json")) == m


def test_likelihood_to_dir_limits(tmp_path, tiny, three_images):
    # n = every image of the split, one image per solve with one rank: allowed; no standard error of one image
    m = L.likelihood_to_dir(L.LikelihoodConfig(checkpoint=tiny, n=1, batch=1, rtol=1e-2, atol=1e-2),
                            str(tmp_path / "one"), comm=SingleProcess())
    assert m["bits_per_dim_se"] is None and len(m["nfe_per_batch"]) == 1
    m = L.likelihood_to_dir(L.LikelihoodConfig(checkpoint=tiny, n=3, batch=3, rtol=1e-2, atol=1e-2),
                            str(tmp_path / "all"))
    assert len(m["nfe_per_batch"]) == 1
    with pytest.raises(ValueError, match="n = 4 is more than the 3 images of mnist5k heldout"):
        L.likelihood_to_dir(L.LikelihoodConfig(checkpoint=tiny, n=4), str(tmp_path / "four"))
    three = types.SimpleNamespace(size=3, is_root=True)
    with pytest.raises(ValueError, match=r"make 2 ODE solve\(s\), fewer than the 3 ranks .*use --batch <= 1 or fewer"):
        L.likelihood_to_dir(L.LikelihoodConfig(checkpoint=tiny, n=3, batch=2), str(tmp_path / "r"), comm=three)
    with pytest.raises(ValueError, match="use at most n ranks"):
        L.likelihood_to_dir(L.LikelihoodConfig(checkpoint=tiny, n=2, batch=1), str(tmp_path / "r"), comm=three)
    for bad in (dict(n=0), dict(batch=0)):
        with pytest.raises(ValueError, match=list(bad)[0]):
            L.likelihood_to_dir(L.LikelihoodConfig(checkpoint=tiny, **bad), str(tmp_path / "bad"))


def test_dequantize_takes_exactly_the_integers_0_to_255():
    y = L.dequantize(np.array([0, 255]), np.random.default_rng(0))
    assert -1.0 <= y[0] < -1.0 + 2 / 256 and 1.0 - 2 / 256 <= y[1] < 1.0
    for bad in ([-1], [256], [1.5], [np.nan]):
        with pytest.raises(ValueError, match=r"pixels must be integers in 0\.\.255"):
            L.dequantize(np.array(bad), np.random.default_rng(0))


def test_only_a_noise_predictor_has_a_likelihood_here():
    model = types.SimpleNamespace(name="no-kind")
    with pytest.raises(ValueError, match="'no-kind' is not a noise predictor"):
        L.image_bits_per_dim(model, {}, np.zeros((1, 4), np.int64), np.random.default_rng(0))
