"""The classifier-based scores behave (real ~ real, noise is bad, one repeated image has
zero label entropy, a set against itself has FD 0), the classifier cache, the
`evaluate`/`compare` commands end to end, and one test per bad input.

The fixture classifier is a narrow version of the report's CNN (channels 8, 16; 32
features) trained for 120 steps: enough for these properties, a few seconds on 2 cores.
"""
import json
import os
import re

import numpy as np
import pytest

from refdiff import cli
from refdiff import image_scores as E
from refdiff.checkpoint import save_model
from refdiff.nn import make_model
from refdiff.objectives import ClassifierObjective


@pytest.fixture(scope="module")
def real():
    return E.load_real("mnist5k")


@pytest.fixture(scope="module")
def small_clf(real):
    x_tr, y_tr, x_te, y_te = real
    clf = make_model("classifier", seed=0, channels=(8, 16), hidden=32)
    obj = ClassifierObjective(clf, dict(shift=0))
    rng = np.random.default_rng(0)
    for _ in range(120):
        i = rng.choice(len(x_tr), 32, replace=False)
        obj.step(x_tr[i], y_tr[i], rng)
    return clf


@pytest.fixture(scope="module")
def ev(real, small_clf):
    """Statistics from the training split and the first half of the held-out split; the
    second half plays a perfect generator."""
    x_tr, _, x_te, y_te = real
    return E.Evaluator(small_clf, x_tr, x_te[:500], y_te[:500])


def test_fixture_classifier_is_decent(ev):
    assert ev.accuracy > 0.8, ev.accuracy


def test_real_heldout_scores_like_real(ev, real):
    """Unseen real digits: MML within 4 standard errors of the real MML (two independent
    means of 500 max logits); FD within a factor 2 of the real-vs-real floor (same set
    size, 500: the FD estimate is noisy there, 20 random half-splits of the held-out set
    gave ratios from 0.44 to 1.62); labels nearly uniform (mnist5k is balanced)."""
    x = real[2][500:]
    m, logits = ev.score(x)
    top_a, top_b = logits.max(1), ev.real_heldout_logits.max(1)
    se = np.sqrt(top_a.var() / len(top_a) + top_b.var() / len(top_b))
    assert abs(m["mml"] - m["mml_real_heldout"]) < 4 * se, (m["mml"], m["mml_real_heldout"], se)
    assert m["mml_ratio"] == pytest.approx(m["mml"] / m["mml_real_heldout"])
    assert m["fd_features"] < 2 * m["fd_features_real_vs_real"], (m["fd_features"], m["fd_features_real_vs_real"])
    assert m["label_entropy"] > 2.2 and sum(m["label_hist"]) == m["n"] == 500


def test_noise_scores_badly(ev):
    """Uniform noise in [-1, 1]: feature FD > 100x the floor (it is ~600x), MML ratio < 0.8."""
    x = np.random.default_rng(0).uniform(-1, 1, (500, 1, 28, 28))
    m, _ = ev.score(x)
    assert m["fd_features"] > 100 * m["fd_features_real_vs_real"] and m["mml_ratio"] < 0.8, m


def test_one_image_repeated_has_zero_entropy(ev, real):
    m, _ = ev.score(np.repeat(real[2][:1], 300, axis=0))
    assert m["label_entropy"] == 0.0 and max(m["label_hist"]) == 300
    assert m["fd_features"] > 100 * m["fd_features_real_vs_real"]


def test_fd_of_a_set_with_itself_is_zero(small_clf, real):
    x = real[0][:1000]
    ev = E.Evaluator(small_clf, x, real[2])
    m, _ = ev.score(x)
    assert m["fd_features"] < 1e-6 * ev.fd_floor + 1e-8, (m["fd_features"], ev.fd_floor)
    assert m["classifier_accuracy"] is None


def test_label_entropy_values():
    assert E.label_entropy([0, 5, 0]) == 0.0
    assert E.label_entropy([3] * 10) == pytest.approx(np.log(10), rel=1e-12)
    assert E.label_entropy([1, 1, 0, 0]) == pytest.approx(np.log(2), rel=1e-12)


def test_best_per_label(real):
    logits = np.full((4, 10), -5.0)
    logits[0, 3], logits[1, 3], logits[2, 7], logits[3, 7] = 2.0, 9.0, 4.0, 1.0
    x = real[2][:4]
    best = E.best_per_label(x, logits)
    assert best[3][1] == 9.0 and np.array_equal(best[3][0], x[1, 0])
    assert best[7][1] == 4.0 and np.array_equal(best[7][0], x[2, 0])
    assert best[0] == (None, None)


def test_images_are_never_rescaled(real):
    """The report min-max normalised one model's images: check_images only checks (and clips
    float rounding within 1e-3), so a dim set stays dim."""
    x = 0.5 * real[2][:10]
    assert np.array_equal(E.check_images(x), x.astype(np.float32))
    y = x.copy()
    y[0, 0, 0, 0] = 1.0005
    assert E.check_images(y).max() == 1.0


# --- classifier cache -------------------------------------------------------------------------------------
def test_default_path_and_train_on_first_use(tmp_path, monkeypatch, real):
    """No checkpoint at the default path: train (here 1 epoch on 64 images, to stay fast),
    say so, cache it; the second call loads it without training."""
    monkeypatch.setenv("REFDIFF_CACHE", str(tmp_path))
    path = E.default_classifier_path("mnist5k")
    assert path == str(tmp_path / "classifier-mnist5k.npz")
    x_tr, y_tr, x_te, y_te = real
    logs = []
    clf, got = E.load_or_train_classifier(None, log=logs.append, data=(x_tr[:64], y_tr[:64], x_te[:50], y_te[:50]),
                                          epochs=1)
    assert got == path and os.path.exists(path) and clf.kind == "classifier"
    assert "training one on mnist5k" in logs[0] and "epoch 1/1" in logs[1]
    logs.clear()
    clf2, _ = E.load_or_train_classifier(None, log=logs.append)
    assert logs == [] and all(np.array_equal(clf.params[k], clf2.params[k]) for k in clf.params)


# --- commands ---------------------------------------------------------------------------------------------
@pytest.fixture
def cached(tmp_path, monkeypatch, small_clf):
    """The fixture classifier saved where `evaluate`/`compare` look by default."""
    monkeypatch.setenv("REFDIFF_CACHE", str(tmp_path / "cache"))
    save_model(E.default_classifier_path("mnist5k"), small_clf)
    return tmp_path


def test_evaluate_command(cached, real, small_clf):
    """The command writes the library's numbers for the same classifier and images."""
    np.save(cached / "s.npy", real[2][:200])
    assert cli.main(["evaluate", "--samples", str(cached / "s.npy"), "--out", str(cached / "ev")]) == 0
    m = json.loads((cached / "ev" / "metrics.json").read_text())
    want, _ = E.Evaluator(small_clf, real[0], real[2], real[3]).score(real[2][:200])
    for k in ("mml", "mml_ratio", "label_hist", "label_entropy", "fd_features", "fd_features_real_vs_real",
              "n", "classifier_accuracy"):
        assert m[k] == pytest.approx(want[k], rel=1e-9), k


def test_compare_command(cached):
    """Untrained VAE and GAN checkpoints (any subset of models works): every output exists,
    rows in the report's order, the samples are in [-1, 1]."""
    for name in ("vae", "gan"):
        save_model(cached / f"{name}.npz", make_model(name, seed=1))
    out = cached / "cmp"
    assert cli.main(["compare", "--out", str(out), "--gan", str(cached / "gan.npz"),
                     "--vae", str(cached / "vae.npz"), "--n", "200"]) == 0
    t = json.loads((out / "table.json").read_text())
    assert [r["model"] for r in t["rows"]] == ["real", "vae", "gan"]
    assert t["rows"][0]["mml_ratio"] == pytest.approx(1.0) and t["rows"][1]["n"] == 200
    for f in ("table.md", "labels.png", "best.png", "samples-vae.npy", "samples-gan.npy"):
        assert (out / f).stat().st_size > 0, f
    s = np.load(out / "samples-gan.npy")
    assert s.shape == (200, 1, 28, 28) and s.min() >= -1 and s.max() <= 1
    assert "| VAE | 200 |" in (out / "table.md").read_text()


def test_compare_ddpm_only(cached):
    """A DDPM row alone, through refdiff.ddpm (an untrained unet-small, 2 DDIM steps): its
    images overshoot [-1, 1] and are clipped like every other model's, never rescaled."""
    save_model(cached / "ddpm.npz", make_model("unet-small", seed=0))
    out = cached / "cmp"
    assert cli.main(["compare", "--out", str(out), "--ddpm", str(cached / "ddpm.npz"), "--n", "40",
                     "--sampler", "ddim", "--steps", "2"]) == 0
    t = json.loads((out / "table.json").read_text())
    assert [r["model"] for r in t["rows"]] == ["real", "ddpm"] and t["rows"][1]["sampler"] == "ddim"
    s = np.load(out / "samples-ddpm.npy")
    assert s.shape == (40, 1, 28, 28) and s.min() == -1 and s.max() == 1
    pytest.importorskip("numba")
    assert cli.main(["compare", "--out", str(cached / "cmp-numba"), "--ddpm", str(cached / "ddpm.npz"), "--n", "40",
                     "--sampler", "ddim", "--steps", "2", "--backend", "numba"]) == 0
    np.testing.assert_allclose(np.load(cached / "cmp-numba" / "samples-ddpm.npy"), s, rtol=0, atol=1e-4,
                               err_msg="the numba backend draws other images from the same seed")


def test_compare_wrong_kind_of_checkpoint(cached, capsys):
    save_model(cached / "gan.npz", make_model("gan"))
    assert cli.main(["compare", "--out", str(cached / "c"), "--vae", str(cached / "gan.npz"), "--n", "10"]) == 2
    assert "holds a 'gan' model" in capsys.readouterr().err


def test_compare_missing_checkpoint(cached, capsys):
    assert cli.main(["compare", "--out", str(cached / "c"), "--gan", str(cached / "nope.npz")]) == 2
    err = capsys.readouterr().err
    assert "--gan checkpoint" in err and "does not exist" in err


def test_evaluate_missing_samples_file(tmp_path, capsys):
    assert cli.main(["evaluate", "--samples", str(tmp_path / "none.npy"), "--out", str(tmp_path)]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_evaluate_missing_classifier(tmp_path, capsys, real):
    np.save(tmp_path / "s.npy", real[2][:10])
    assert cli.main(["evaluate", "--samples", str(tmp_path / "s.npy"), "--out", str(tmp_path),
                     "--classifier", str(tmp_path / "no.npz")]) == 2
    assert "classifier checkpoint" in capsys.readouterr().err


# --- bad input: one test each ---------------------------------------------------------------------------
def test_wrong_image_shape():
    with pytest.raises(ValueError, match=r"must have shape \(N, 1, 28, 28\); got \(5, 28, 28\)"):
        E.check_images(np.zeros((5, 28, 28)))


def test_pixels_above_range():
    with pytest.raises(ValueError, match=r"pixel values must lie in \[-1, 1\]; got \[0, 255\]"):
        E.check_images(np.linspace(0, 255, 10 * 784).reshape(10, 1, 28, 28))


def test_pixels_in_unit_interval():
    x = np.random.default_rng(0).uniform(0, 1, (10, 1, 28, 28))
    with pytest.raises(ValueError, match=r"look like \[0, 1\] images"):
        E.check_images(x)
    assert E.check_images(x, allow_nonnegative=True).shape == x.shape    # compare's generated sets


def test_nan_images():
    x = -np.ones((10, 1, 28, 28))
    x[3, 0, 5, 5] = np.nan
    with pytest.raises(ValueError, match="contain 1 NaN or Inf"):
        E.check_images(x)


def test_too_few_images_for_a_covariance():
    with pytest.raises(ValueError, match="need at least 2 images"):
        E.check_images(-np.ones((1, 1, 28, 28)))


def test_non_numeric_images():
    with pytest.raises(ValueError, match="must be real numbers"):
        E.check_images(np.full((3, 1, 28, 28), "a"))


def test_evaluator_needs_a_classifier(real):
    with pytest.raises(ValueError, match="needs a classifier model"):
        E.Evaluator(make_model("vae"), real[0][:10], real[2][:10])


# --- per-class scores (the classes asked for, labels.npy) -------------------------------------------------------
def _se(p, n):
    return np.sqrt(p * (1 - p) / n)


def test_per_class_real_digits_with_their_labels(ev, real):
    """Unseen real digits asked for their true class: the share labelled as asked is the
    classifier's accuracy, measured on the other half of the held-out set (two independent
    estimates from 500 digits each: within 4 standard errors of their difference); the
    per-class shares weighted by n_k add up to it exactly, and the counts are the labels'."""
    x, y = real[2][500:], real[3][500:]
    m, _ = ev.score(x, labels=y)
    p = ev.accuracy
    assert abs(m["class_accuracy"] - p) <= 4 * np.sqrt(2) * _se(p, 500), (m["class_accuracy"], p)
    rows = m["per_class"]
    assert [r["label"] for r in rows] == list(range(10)) and [r["n"] for r in rows] == list(np.bincount(y))
    assert sum(r["n"] * r["accuracy"] for r in rows) / len(y) == pytest.approx(m["class_accuracy"], rel=1e-12)


def test_per_class_shuffled_labels_are_chance(ev, real):
    """The same digits with their labels permuted: a digit matches its label by chance, so
    the share is sum_k n_k m_k / N^2 (n_k the labels' counts, m_k the predictions'), ~10 %
    here, within 4 standard errors; and a class's FD is now far above its floor, since its
    images are digits of every class."""
    x, y = real[2][500:], real[3][500:]
    shuffled = np.random.default_rng(0).permutation(y)
    m, logits = ev.score(x, labels=shuffled)
    pred_counts = np.bincount(logits.argmax(1), minlength=10)
    chance = float(np.bincount(shuffled, minlength=10) @ pred_counts) / len(y) ** 2
    assert 0.08 < chance < 0.12
    assert abs(m["class_accuracy"] - chance) <= 4 * _se(chance, len(y)), (m["class_accuracy"], chance)
    true, _ = ev.score(x, labels=y)
    for r, t in zip(m["per_class"], true["per_class"]):
        assert r["fd_features"] > 3 * t["fd_features"], (r, t)


def test_per_class_scores_by_hand():
    """Two classes asked for, features chosen so that each FD is a closed form: class 0's
    images are the reference digits shifted by (1, 0) (FD = |shift|^2 = 1: same covariance),
    class 3 has one image (no covariance: None); the accuracies count argmax == asked."""
    rng = np.random.default_rng(1)
    real = rng.standard_normal((20, 2))
    feats = np.concatenate([real[:20] + [1.0, 0.0], rng.standard_normal((1, 2))])
    real_feats, real_labels = real[:20], np.zeros(20, int)
    logits = np.zeros((21, 10))
    logits[:15, 0] = logits[15:20, 7] = logits[20, 3] = 1.0       # 15 of class 0 labelled 0, 5 labelled 7
    got = E.per_class_scores(logits, feats, np.array([0] * 20 + [3]), real_feats, real_labels)
    assert got["class_accuracy"] == pytest.approx(16 / 21)
    c0, c3 = got["per_class"]
    assert (c0["label"], c0["n"], c0["accuracy"]) == (0, 20, 0.75)
    assert c0["fd_features"] == pytest.approx(1.0, rel=1e-9)      # sqrtm of S S: rounding only
    assert (c3["label"], c3["n"], c3["accuracy"], c3["fd_features"]) == (3, 1, 1.0, None)


def test_evaluate_reads_labels_next_to_the_samples(cached, real, capsys):
    """labels.npy beside samples.npy is used (per_class in metrics.json), --labels none ignores
    it, --labels FILE names another; a wrong length, a class out of range, floats, a missing
    file: exit 2, one line naming the file."""
    d = cached / "run"
    d.mkdir()
    np.save(d / "samples.npy", real[2][:200])
    np.save(d / "labels.npy", real[3][:200].astype(np.int64))
    assert cli.main(["evaluate", "--samples", str(d / "samples.npy"), "--out", str(cached / "ev")]) == 0
    m = json.loads((cached / "ev" / "metrics.json").read_text())
    assert [r["n"] for r in m["per_class"]] == list(np.bincount(real[3][:200])) and 0 <= m["class_accuracy"] <= 1
    assert m["labels"] == str(d / "labels.npy") and "class 0: n" in capsys.readouterr().out
    assert cli.main(["evaluate", "--samples", str(d / "samples.npy"), "--out", str(cached / "ev"),
                     "--labels", "none"]) == 0
    assert "per_class" not in json.loads((cached / "ev" / "metrics.json").read_text())
    for bad, message in ((np.zeros(199, np.int64), r"must have shape \(200,\)"),
                         (np.full(200, 10), r"must lie in 0..9"),
                         (np.zeros(200), "must be integers")):
        np.save(cached / "bad.npy", bad)
        capsys.readouterr()
        assert cli.main(["evaluate", "--samples", str(d / "samples.npy"), "--out", str(cached / "ev"),
                         "--labels", str(cached / "bad.npy")]) == 2
        err = capsys.readouterr().err
        assert re.search(message, err) and "bad.npy" in err and err.strip().count("\n") == 0, err
    assert cli.main(["evaluate", "--samples", str(d / "samples.npy"), "--out", str(cached / "ev"),
                     "--labels", str(cached / "none.npy")]) == 2
    assert "labels file" in capsys.readouterr().err
