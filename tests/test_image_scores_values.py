"""refdiff.image_scores' file-level functions and refdiff.compare's table, by value: every
score is recomputed here from the classifier's own logits (Classifier.predict on the same
images), the real statistics from the held-out split loaded separately, and the table's
cells by hand from the report's numbers. A narrow classifier (channels 2, 3; 4 features)
keeps the passes over mnist5k's 5,000 images under a second; its scores mean nothing,
only their arithmetic is checked.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from refdiff import compare
from refdiff import image_scores as E
from refdiff.checkpoint import load_model, save_model
from refdiff.nn import make_model
from tests.helpers import TOL, assert_close


@pytest.fixture(scope="module")
def narrow_clf(tmp_path_factory):
    clf = make_model("classifier", seed=0, channels=(2, 3), hidden=4)
    path = tmp_path_factory.mktemp("clf") / "classifier.npz"
    save_model(path, clf)
    return clf, str(path)


def test_logits_features_batches_agree_with_one_pass(narrow_clf):
    # bug caught: the last partial batch dropped or a batch boundary off by one
    clf, _ = narrow_clf
    x = np.random.default_rng(0).uniform(-1, 1, (7, 1, 28, 28)).astype(np.float32)
    ev = E.Evaluator.__new__(E.Evaluator)              # only the batching: no real statistics needed
    ev.clf, ev.batch = clf, 3
    lg, ft = ev.logits_features(x)
    ref_l, ref_f = clf.logits_and_features(x)
    assert lg.dtype == ft.dtype == np.float64 and lg.shape == (7, 10) and ft.shape == (7, 4)
    # float32 BLAS sums in another order for another batch size: TOL[float32]
    assert_close(lg, ref_l, name="logits", **TOL[np.dtype(np.float32)])
    assert_close(ft, ref_f, name="features", **TOL[np.dtype(np.float32)])


def test_load_samples_round_trip_and_refusals(tmp_path):
    x = np.random.default_rng(0).uniform(-1, 1, (3, 1, 28, 28)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    got = E.load_samples(tmp_path / "x.npy")
    assert got.dtype == np.float32 and np.array_equal(got, x)
    np.savez(tmp_path / "x.npz", a=x)
    with pytest.raises(ValueError, match="several arrays"):
        E.load_samples(tmp_path / "x.npz")
    (tmp_path / "bad.npy").write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(ValueError, match="not a readable .npy"):
        E.load_samples(tmp_path / "bad.npy")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        E.load_samples(tmp_path / "none.npy")


def test_score_file_and_build_evaluator_recomputed(tmp_path, narrow_clf):
    # bug caught: the real-digit MML taken from the training split, a histogram of the wrong
    # axis, metrics.json differing from what is returned, the EMA/params mix-up on loading
    clf, path = narrow_clf
    _, _, x_he, y_he = E.load_real("mnist5k")
    x = np.random.default_rng(1).uniform(-1, 1, (12, 1, 28, 28)).astype(np.float32)
    np.save(tmp_path / "samples.npy", x)
    m = E.score_file(str(tmp_path / "samples.npy"), tmp_path / "out", classifier=path)
    logits = clf.predict(x).astype(np.float64)
    real_logits = clf.predict(x_he).astype(np.float64)
    assert m["n"] == 12
    assert m["mml"] == pytest.approx(logits.max(1).mean(), rel=1e-6)   # float32 logits in other batches: a few ulps (6e-8) each
    assert m["mml_real_heldout"] == pytest.approx(real_logits.max(1).mean(), rel=1e-6)
    assert m["mml_ratio"] == pytest.approx(m["mml"] / m["mml_real_heldout"], rel=1e-12)
    assert m["label_hist"] == np.bincount(logits.argmax(1), minlength=10).tolist()
    assert m["classifier_accuracy"] == pytest.approx(np.mean(real_logits.argmax(1) == y_he), abs=1e-12)
    assert m["samples"] == str(tmp_path / "samples.npy") and m["classifier"] == os.path.abspath(path)
    with open(tmp_path / "out" / "metrics.json") as f:
        assert json.load(f) == json.loads(json.dumps(m))
    ev, got = E.build_evaluator(path)
    assert got == path and ev.n_train == 4000 and ev.n_heldout == 1000
    assert ev.accuracy == m["classifier_accuracy"] and ev.fd_floor == m["fd_features_real_vs_real"]


def test_train_classifier_saves_the_averaged_weights(tmp_path):
    # bug caught: the raw weights saved (the accuracy reported is the averaged weights'), an
    # epoch count or seed not recorded
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (16, 1, 28, 28)).astype(np.float32)
    x[:, :, 0, 0] = -1                                   # at least one pixel below 0 per set
    y = np.arange(16) % 10
    lines = []
    model, info = E.train_classifier(tmp_path / "c.npz", epochs=2, seed=3, shift=1, batch=8, log=lines.append,
                                     data=(x, y, x[:6], y[:6]))
    assert len(lines) == 2 and lines[1].startswith("classifier epoch 2/2")
    loaded, sections, meta = load_model(tmp_path / "c.npz", expect="classifier")
    assert all(np.array_equal(loaded.params[k], model.params[k]) for k in model.params)
    acc = float(np.mean(loaded.predict(x[:6]).argmax(1) == y[:6]))
    assert meta["classifier_accuracy"] == info["classifier_accuracy"] == acc
    assert (meta["epochs"], meta["seed"], meta["shift"], meta["batch"]) == (2, 3, 1, 8)


# --- refdiff.compare's table ------------------------------------------------------------------------------
def _row(row, n, mml, ratio, entropy, hist, fd, **info):
    return dict(row=row, metrics=dict(n=n, mml=mml, mml_ratio=ratio, label_entropy=entropy, label_hist=hist,
                                      fd_features=fd, classifier_accuracy=0.987), info=info)


def test_table_markdown_cells_by_hand():
    # bug caught: the report's ratio computed against the wrong row, missing labels from the
    # wrong entries, columns shifted
    rows = [_row("real", 1000, 18.1234, 1.0, 2.3012, [100] * 10, 0.4, source="mnist5k", split="held-out"),
            _row("gan", 1000, 12.5, 0.68972, 1.9, [0, 200, 100, 0, 100, 100, 200, 100, 100, 100], 35.456,
                 checkpoint="g.npz", sample_seconds=3.0)]
    md = compare.table_markdown(rows, floor=1.234)
    lines = md.splitlines()
    assert lines[0].endswith("| FD features (floor 1.23) |")
    assert lines[2] == "| real (held-out) | 1000 | 18.123 | 1.000 | 1.000 | 2.301 | - | 0.40 |"
    # the report's GAN ratio: 11.0247 / 18.9480 = 0.58184
    assert lines[3] == "| GAN | 1000 | 12.500 | 0.690 | 0.582 | 1.900 | 0,3 | 35.46 |"
    assert "- GAN: [0, 200, 100, 0, 100, 100, 200, 100, 100, 100]" in lines
    assert "Classifier held-out accuracy 0.987; MML of real held-out digits 18.123" in md
    assert "- GAN: checkpoint g.npz" in lines and "sample_seconds" not in md


def test_compare_config_validate():
    cfg = compare.CompareConfig(checkpoints={"vae": "v.npz", "ddpm": "d.npz"})
    assert cfg.validate() is cfg and (cfg.n, cfg.seed, cfg.data, cfg.use_ema) == (1000, 0, "mnist5k", True)
    for bad, msg in (({"checkpoints": {"real": "r.npz"}}, r"unknown rows \['real'\]"),
                     ({"checkpoints": {}, "n": 1}, "n must be an integer >= 2"),
                     ({"checkpoints": {}, "n": True}, "n must be an integer >= 2")):
        with pytest.raises(ValueError, match=msg):
            compare.CompareConfig(**bad).validate()


# --- labels, the rebuilt model, the shared classifier ------------------------------------------------------
def test_check_labels_values_and_refusals():
    y = E.check_labels(np.array([3, 0, 9], dtype=np.int8), 3)
    assert y.dtype == np.int64 and y.tolist() == [3, 0, 9]
    for bad, msg in (([1, 2], r"must have shape \(3,\)"), ([0, 10, 1], r"must lie in 0..9; got values in \[0, 10\]"),
                     ([-1, 0, 1], r"got values in \[-1, 1\]"), ([0.0, 1.0, 2.0], "must be integers")):
        with pytest.raises(ValueError, match=msg):
            E.check_labels(np.array(bad), 3)


def test_labels_path_auto_none_and_given(tmp_path):
    samples = tmp_path / "samples.npy"
    assert E.labels_path(str(samples)) is None                       # auto, nothing there
    np.save(tmp_path / "labels.npy", np.arange(3))
    assert E.labels_path(str(samples)) == str(tmp_path / "labels.npy")
    assert E.labels_path(str(samples), None) is None and E.labels_path(str(samples), "none") is None
    other = tmp_path / "y.npy"
    np.save(other, np.arange(3))
    assert E.labels_path(str(samples), str(other)) == str(other)
    with pytest.raises(FileNotFoundError, match="labels file .* does not exist"):
        E.labels_path(str(samples), str(tmp_path / "missing.npy"))


def test_load_model_from_state_rebuilds_the_same_function(narrow_clf):
    clf, _ = narrow_clf
    m = E.load_model_from_state(clf.spec(), clf.state())
    assert type(m) is type(clf) and m.config == clf.config and m.params is not clf.params
    x = np.random.default_rng(2).uniform(-1, 1, (2, 1, 28, 28)).astype(np.float32)
    assert np.array_equal(m.predict(x), clf.predict(x))


def test_one_process_split_and_shared_classifier(narrow_clf):
    from refdiff.distributed import SingleProcess

    clf, path = narrow_clf
    ev = E.Evaluator.__new__(E.Evaluator)
    ev.clf, ev.batch, ev.comm = clf, 4, SingleProcess()
    x = np.random.default_rng(3).uniform(-1, 1, (5, 1, 28, 28)).astype(np.float32)
    got, ref = ev.split_logits_features(x, "five images"), ev.logits_features(x)
    assert all(np.array_equal(a, b) for a, b in zip(got, ref))      # one rank: the whole pass, in order
    model, got_path = E.shared_classifier(SingleProcess(), path)
    assert got_path == path and all(np.array_equal(model.params[k], clf.params[k]) for k in clf.params)
