"""`refdiff evaluate | compare | likelihood` on 2 MPI ranks (launched from pytest as
tests/test_mpi.py does, with its launcher) against the same commands in one process.

- evaluate: the classifier's passes over the real and the scored images are split by image
  index; rank 0 scores. With a float64 classifier every metric (per-class ones included)
  agrees within 1e-10 relative: the ranks run the classifier on batches of another size
  (200 + 200 images instead of 400), and a matrix product's rounding depends on it (~1e-16
  relative per feature); the Fréchet distance subtracts traces larger than it and sqrtm
  amplifies that (measured: 2e-12 relative in the worst metric), still far below 1e-10. With the
  float32 classifier (what `refdiff evaluate` runs), the distance of the 2-rank metrics to
  the 1-process ones is at most 4 x the float32 classifier's own error against float64 (the
  suite's float32 rule, refdiff_cuda.testing.check_op); the label counts are equal.
- compare: under mpirun image k of a row draws from default_rng([seed, row, k]), so 2 ranks
  draw the images 1 rank (comm=SingleProcess() here) draws, float64 models: equal to within
  one float32 rounding of the saved images (6e-8: the float64 images agree to ~1e-15 and the
  file rounds them to float32); the 2-rank table scores those images as one process does.
- likelihood: whole ODE solves split over the ranks, per-image streams: the same
  bits/dim as one process (1e-12 relative: the same arithmetic on the same batches).
- the evaluator's classifier, when none is cached, is trained by rank 0 alone and its
  weights reach the other rank unchanged.
- faults: rank 1 raises inside the classifier pass -> the job ends non-zero within
  FAULT_BOUND_S and writes nothing; bad input under mpirun -> exit 2 and one message.
- in one process: split_rows' shares (whole units, in order, covering every row) for every
  number of ranks, root_then_bcast, the per-row streams, the likelihood rows of each rank
  against one process's, and that one-process scoring does not import mpi4py.

Run as a script (`python tests/test_mpi_evaluate.py MODE DIR`) it is the program each rank runs.
"""
from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest

HERE = os.path.abspath(__file__)
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))
from tests.test_mpi import FAULT_BOUND_S, _mpirun_cmd  # noqa: E402  (the launcher of the 2-rank tests)

N_SAMPLES, N_COMPARE = 400, 40
LIK = dict(n=4, batch=1, rtol=1e-3, atol=1e-3)     # 4 ODE solves: 2 per rank


def _write_idx(path, a):
    """An MNIST-format IDX file of uint8 array `a` (magic 00 00 08 rank, big-endian sizes)."""
    a = np.asarray(a, dtype=np.uint8)
    path.write_bytes(bytes([0, 0, 8, a.ndim]) + np.asarray(a.shape, dtype=">u4").tobytes() + a.tobytes())


def _small_real_set(d):
    """The real images the scores use (--data idx:DIR): the first 1,000 training and 500
    held-out digits of mnist5k, so that the evaluators of every run are 3x cheaper to build."""
    from refdiff.image_scores import load_real

    x_tr, y_tr, x_te, y_te = load_real("mnist5k")
    (d / "idx").mkdir()
    for stem, x, y in (("train", x_tr[:1000], y_tr[:1000]), ("t10k", x_te[:500], y_te[:500])):
        _write_idx(d / "idx" / f"{stem}-images-idx3-ubyte", np.round((x[:, 0] + 1) * 127.5))
        _write_idx(d / "idx" / f"{stem}-labels-idx1-ubyte", y)


def data(d):
    return f"idx:{d / 'idx'}"


# --- the inputs, made once in the test process ---------------------------------------------------------------
def make_inputs(d):
    """Classifiers (float64, float32: the same weights; 16 features), 400 real held-out digits
    with their labels.npy (about 40 per class: more than 16, so that each class's feature
    covariance has full rank), float64 VAE and GAN, and a float64 eps checkpoint (an MLP trained one epoch)."""
    import contextlib
    import io

    from refdiff.checkpoint import save_model
    from refdiff.cli import main
    from refdiff.image_scores import load_real
    from refdiff.nn import make_model
    from refdiff.objectives import ClassifierObjective

    x_tr, y_tr, x_te, y_te = load_real("mnist5k")
    clf64 = make_model("classifier", seed=0, channels=(8, 16), hidden=16, dtype=np.float64)
    obj, rng = ClassifierObjective(clf64, dict(shift=0)), np.random.default_rng(0)
    for _ in range(40):           # trained a little, so that labels and per-class scores vary
        i = rng.choice(len(x_tr), 32, replace=False)
        obj.step(x_tr[i], y_tr[i], rng)
    clf32 = make_model("classifier", seed=0, channels=(8, 16), hidden=16, dtype=np.float32)
    clf32.load_state(clf64.state())
    save_model(d / "clf64.npz", clf64)
    save_model(d / "clf32.npz", clf32)
    (d / "s").mkdir()
    _small_real_set(d)
    # the "samples": held-out digits that the reference set (the first 500) does not hold
    np.save(d / "s" / "samples.npy", x_te[500:500 + N_SAMPLES])
    np.save(d / "s" / "labels.npy", np.asarray(y_te[500:500 + N_SAMPLES], dtype=np.int64))
    for name in ("vae", "gan"):
        save_model(d / f"{name}.npz", make_model(name, seed=1, dtype=np.float64))
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        assert main(["train", "--out", str(d / "run"), "--model", "mlp", "--model-arg", "widths=[8]",
                     "--limit", "16", "--epochs", "1", "--dtype", "float64"]) == 0


def compare_args(d, out):
    return ["compare", "--out", str(out), "--vae", str(d / "vae.npz"), "--gan", str(d / "gan.npz"),
            "--ddpm", str(d / "run" / "checkpoint.npz"), "--n", str(N_COMPARE), "--sampler", "ddim",
            "--steps", "2", "--classifier", str(d / "clf64.npz"), "--data", data(d)]


def likelihood_args(d, out):
    return ["likelihood", "--checkpoint", str(d / "run" / "checkpoint.npz"), "--out", str(out)] + [
        x for k, v in LIK.items() for x in (f"--{k.replace('_', '-')}", str(v))]


def evaluate_args(d, out, clf):
    return ["evaluate", "--samples", str(d / "s" / "samples.npy"), "--out", str(out), "--classifier",
            str(d / clf), "--data", data(d)]


# --- the program of each rank ----------------------------------------------------------------------------------
def _main(mode, d):
    import pathlib

    from refdiff import image_scores
    from refdiff.cli import main
    from refdiff.distributed import abort_on_error, get_comm

    d = pathlib.Path(d)
    comm = get_comm()
    with abort_on_error(comm):
        if mode == "all":
            for clf in ("clf64.npz", "clf32.npz"):
                assert main(evaluate_args(d, d / f"ev2-{clf}", clf)) == 0
            assert main(compare_args(d, d / "cmp2")) == 0
            assert main(likelihood_args(d, d / "lik2")) == 0
            # no cached classifier: rank 0 trains one (1 epoch on 64 images), rank 1 receives it
            os.environ["REFDIFF_CACHE"] = str(d / "cache")
            x_tr, y_tr, x_te, y_te = image_scores.load_real("mnist5k")
            logs = []
            model, _ = image_scores.shared_classifier(comm, None, log=logs.append, epochs=1,
                                                      data=(x_tr[:64], y_tr[:64], x_te[:32], y_te[:32]))
            from refdiff.distributed import state_digest
            got = comm.allgather((sum("training one" in s for s in logs), state_digest(model)))
            if comm.is_root:
                (d / "trained.json").write_text(json.dumps(got))
        elif mode == "fault":
            if comm.rank == 1:
                def broken(self, x):
                    raise RuntimeError("injected failure in the classifier pass")
                image_scores.Evaluator.logits_features = broken
            return main(evaluate_args(d, d / "fault", "clf32.npz"))
    return 0


# --- the tests ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("mpi_eval")
    make_inputs(d)
    return d


@pytest.fixture(scope="module")
def two_ranks(inputs):
    """Every command on 2 ranks (one mpirun, the commands through refdiff.cli.main)."""
    proc, seconds = _mpirun_cmd([sys.executable, HERE, "all", str(inputs)], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    print(f"2 ranks: evaluate x2, compare, likelihood, classifier training in {seconds:.1f} s")
    return inputs


@pytest.fixture(scope="module")
def evaluators(inputs):
    """One process's evaluators with the float64 and the float32 classifier."""
    from refdiff.image_scores import build_evaluator

    return {dt: build_evaluator(str(inputs / f"clf{dt}.npz"), data(inputs))[0] for dt in ("64", "32")}


def _metrics(path):
    return json.loads(path.read_text())


def _floats(m):
    """The float metrics of evaluate's metrics.json, per-class ones included, by name."""
    out = {k: m[k] for k in ("mml", "mml_ratio", "mml_real_heldout", "label_entropy", "fd_features",
                             "fd_features_real_vs_real", "class_accuracy")}
    for r in m["per_class"]:
        out.update({f"class {r['label']} {k}": r[k] for k in ("accuracy", "fd_features")
                    if r[k] is not None})
    return out


def test_evaluate_on_two_ranks_gives_one_process_numbers(two_ranks, evaluators):
    d = two_ranks
    x, y = np.load(d / "s" / "samples.npy"), np.load(d / "s" / "labels.npy")
    one = {dt: ev.score(x, "samples", labels=y)[0] for dt, ev in evaluators.items()}
    m2, m1 = _metrics(d / "ev2-clf64.npz" / "metrics.json"), one["64"]
    assert m2["ranks"] == 2 and len(m2["per_class"]) == 10 and m2["labels"].endswith("labels.npy")
    for k in ("n", "label_hist", "classifier_accuracy"):
        assert m2[k] == m1[k], k
    assert [(r["label"], r["n"], r["accuracy"]) for r in m2["per_class"]] == [
        (r["label"], r["n"], r["accuracy"]) for r in m1["per_class"]]
    f2, f1 = _floats(m2), _floats(m1)
    print(f"evaluate, float64 classifier: worst relative difference "
          f"{max(abs(f2[k] - v) / abs(v) for k, v in f1.items() if v):.3g}")
    for k, v in f1.items():
        assert abs(f2[k] - v) <= 1e-10 * abs(v), (k, f2[k], v)
    # float32: 2 ranks vs 1 process within 4x the float32 classifier's own error against float64
    g2, g1 = _floats(_metrics(d / "ev2-clf32.npz" / "metrics.json")), _floats(one["32"])
    keys = ["mml", "fd_features", "fd_features_real_vs_real"] + [k for k in f1 if k.endswith("fd_features")]
    own = np.sqrt(sum((g1[k] - f1[k]) ** 2 for k in keys))
    diff = np.sqrt(sum((g2[k] - g1[k]) ** 2 for k in keys))
    print(f"evaluate, float32 classifier: 2 ranks vs 1 process {diff:.3g}, float32 vs float64 {own:.3g}")
    assert own > 0, "the float32 metrics equal the float64 ones: the bound would be vacuous"
    assert diff <= 4 * own, (diff, own)


def test_compare_on_two_ranks_draws_and_scores_one_process_images(two_ranks, evaluators):
    """Each row's images drawn here by one process with the per-image streams of row r,
    default_rng([seed, r, k]), in one call, against the 2-rank files; the 2-rank table's
    scores against one process's scores of those files."""
    from refdiff.compare import ROWS
    from refdiff.distributed import SingleProcess, sample_split
    from refdiff.generate import generate, load_generator

    d = two_ranks
    t2 = json.loads((d / "cmp2" / "table.json").read_text())
    assert [r["model"] for r in t2["rows"]] == ["real", "vae", "gan", "ddpm"]
    paths = dict(vae=d / "vae.npz", gan=d / "gan.npz", ddpm=d / "run" / "checkpoint.npz")
    for i, row in enumerate(("vae", "gan", "ddpm")):
        model, meta, _ = load_generator(str(paths[row]))
        kw = dict(sampler="ddim", steps=2, clip=False) if row == "ddpm" else {}
        x1 = sample_split(SingleProcess(), lambda n, rng: generate(model, meta, n, rng, **kw)[0], N_COMPARE,
                          (0, ROWS.index(row)))
        x2 = np.load(d / "cmp2" / f"samples-{row}.npy")
        assert x2.shape == (N_COMPARE, 1, 28, 28) and np.std(x1) > 0.01, row
        print(f"compare {row}: images 2 ranks vs 1 process, max |difference| {np.max(np.abs(x2 - x1)):.3g}")
        np.testing.assert_allclose(x2, x1, rtol=0, atol=2.0 ** -24, err_msg=row)   # one float32 rounding
        want, _ = evaluators["64"].score(x2, row, allow_nonnegative=True)
        got = t2["rows"][i + 1]
        assert got["ranks"] == 2 and got["label_hist"] == want["label_hist"], row
        for k in ("mml", "fd_features", "label_entropy"):
            assert abs(got[k] - want[k]) <= 1e-10 * abs(want[k]), (row, k, got[k], want[k])
    # images differ from image to image: the streams are per image
    v, g = np.load(d / "cmp2" / "samples-vae.npy"), np.load(d / "cmp2" / "samples-ddpm.npy")
    assert np.max(np.abs(v[0] - v[1])) > 0.01 and np.max(np.abs(g[0] - g[1])) > 0.01


def test_likelihood_on_two_ranks_gives_one_process_numbers(two_ranks):
    from refdiff.distributed import SingleProcess
    from refdiff.likelihood import LikelihoodConfig, likelihood_to_dir

    d = two_ranks
    m1 = likelihood_to_dir(LikelihoodConfig(checkpoint=str(d / "run" / "checkpoint.npz"), **LIK), d / "lik1",
                           comm=SingleProcess())
    m2 = _metrics(d / "lik2" / "metrics.json")
    assert m2["ranks"] == 2 and m2["nfe_per_batch"] == m1["nfe_per_batch"] and len(m1["nfe_per_batch"]) == 4
    for k in ("bits_per_dim_mean", "bits_per_dim_se"):
        print(f"likelihood {k}: 2 ranks {m2[k]!r}, 1 process {m1[k]!r}")
        assert abs(m2[k] - m1[k]) <= 1e-12 * abs(m1[k]), (k, m2[k], m1[k])
    assert m1["bits_per_dim_se"] > 0        # the images' bits/dim differ: not one value repeated


def test_the_classifier_is_trained_once_on_rank_0(two_ranks):
    from refdiff.checkpoint import load_model
    from refdiff.distributed import state_digest

    (n0, dig0), (n1, dig1) = json.loads((two_ranks / "trained.json").read_text())
    assert (n0, n1) == (1, 0) and dig0 == dig1
    cached = load_model(str(two_ranks / "cache" / "classifier-mnist5k.npz"), use_ema=True)[0]
    assert state_digest(cached) == dig0


def test_a_failing_rank_stops_evaluate(inputs):
    proc, seconds = _mpirun_cmd([sys.executable, HERE, "fault", str(inputs)], timeout=FAULT_BOUND_S + 60)
    print(f"fault: exit {proc.returncode} after {seconds:.1f} s")
    assert proc.returncode != 0 and seconds < FAULT_BOUND_S
    assert "injected failure in the classifier pass" in proc.stderr, proc.stderr[-3000:]
    assert not (inputs / "fault" / "metrics.json").exists()


def test_bad_input_under_mpirun_is_one_error(inputs):
    """Fewer ODE solves than ranks: exit 2 and the message, no traceback."""
    cmd = [sys.executable, "-m", "refdiff"] + likelihood_args(inputs, inputs / "bad")
    cmd[cmd.index("--n") + 1], cmd[cmd.index("--batch") + 1] = "2", "2"
    proc, _ = _mpirun_cmd(cmd)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "make 1 ODE solve(s), fewer than the 2 ranks" in proc.stderr


# --- in one process: the pieces, with a stand-in communicator per rank -------------------------------------------
class RankComm:
    """Rank `rank` of `size` without MPI: gather_rows records what it is given and returns it
    on rank 0 (the test assembles the ranks' rows itself); bcast returns `root_value`."""

    def __init__(self, rank, size, root_value=None):
        self.rank, self.size, self.is_root, self.root_value = rank, size, rank == 0, root_value
        self.sent, self.waits = [], []

    def gather_rows(self, a, counts, what=None):
        self.sent.append((a, list(counts)))
        return a if self.is_root else None

    def wait_for_others(self, what=None, seconds=None):
        self.waits.append(seconds)

    def bcast(self, obj, what=None):
        return obj if self.is_root else self.root_value


@pytest.mark.parametrize("n, unit", [(7, 1), (10, 3), (9, 3), (5, 5)])
def test_split_rows_gives_each_rank_whole_units(n, unit):
    """For every N up to the number of units: the ranks' rows [lo, hi) tile [0, n) in order,
    each starts on a unit boundary, each rank sends its rows with the counts of all, and the
    rows are fn's rows (here the row index and its square, two arrays)."""
    from refdiff.distributed import split_rows

    units = -(-n // unit)
    for size in range(1, units + 1):
        rows, spans = [], []
        for r in range(size):
            comm = RankComm(r, size)

            def fn(lo, hi):
                spans.append((lo, hi))
                i = np.arange(lo, hi)
                return i, i ** 2
            out = split_rows(comm, fn, n, "rows", unit=unit)
            assert (out is None) == (r > 0)
            (a, counts), (b, _) = comm.sent
            assert sum(counts) == n
            rows.append((a, b))
            assert comm.waits == ([] if size == 1 else [comm.waits[0]])   # waited once, with 2+ ranks
        assert [lo for lo, _ in spans] == sorted(lo for lo, _ in spans) and spans[0][0] == 0
        assert all(lo % unit == 0 and hi > lo for lo, hi in spans) and spans[-1][1] == n
        assert all(spans[k][1] == spans[k + 1][0] for k in range(size - 1))
        assert counts == [hi - lo for lo, hi in spans]
        got = np.concatenate([a for a, _ in rows])
        assert np.array_equal(got, np.arange(n)) and np.array_equal(np.concatenate([b for _, b in rows]), got ** 2)


def test_split_rows_refusals():
    from refdiff.distributed import split_rows

    with pytest.raises(ValueError, match="2 units cannot be split over 3 ranks"):
        split_rows(RankComm(1, 3), lambda lo, hi: np.zeros(hi - lo), 4, "the solves", unit=3)
    with pytest.raises(ValueError, match=r"rows \[0, 2\) gave an array of shape \(3,\)"):
        split_rows(RankComm(0, 2), lambda lo, hi: np.zeros(3), 4, "the rows")


def test_root_then_bcast_runs_on_rank_0_only():
    from refdiff.distributed import root_then_bcast

    calls = []
    assert root_then_bcast(RankComm(0, 2), lambda: calls.append(0) or "w", "x", untimed=True) == "w"
    other = RankComm(1, 2, root_value="w")
    assert root_then_bcast(other, lambda: calls.append(1), "x", untimed=True) == "w"
    assert calls == [0] and other.waits == [0]           # untimed: the wait is not watched (0)
    timed = RankComm(1, 2, root_value="w")
    root_then_bcast(timed, lambda: None, "x")
    assert timed.waits == [None]                         # the collective timeout


def test_image_streams_of_a_seed_sequence():
    """(seed, row): image k of row r draws from default_rng([seed, r, k]); rows differ."""
    from refdiff.distributed import ImageStreams

    a = ImageStreams((3, 1), range(4)).standard_normal((4, 5))
    assert np.array_equal(a[2], np.random.default_rng([3, 1, 2]).standard_normal(5))
    assert not np.array_equal(a, ImageStreams((3, 2), range(4)).standard_normal((4, 5)))
    assert np.array_equal(ImageStreams(3, [2]).standard_normal((1, 5))[0],
                          np.random.default_rng([3, 2]).standard_normal(5))


def test_split_likelihood_does_not_depend_on_the_split(inputs):
    """split_image_bits_per_dim: rank r's rows, computed as that rank computes them, are one
    process's rows (the same batches, per-image streams), for 1, 2 and 3 ranks."""
    from refdiff.generate import load_generator
    from refdiff.likelihood import split_image_bits_per_dim

    model, meta, _ = load_generator(str(inputs / "run" / "checkpoint.npz"), want="eps")
    pixels = np.random.default_rng(0).integers(0, 256, (3, 1, 28, 28))
    kw = dict(batch=1, rtol=1e-3, atol=1e-3)
    one = split_image_bits_per_dim(RankComm(0, 1), model, meta, pixels, 5, **kw)
    for size in (2, 3):
        comms = [RankComm(r, size) for r in range(size)]
        for c in comms:
            split_image_bits_per_dim(c, model, meta, pixels, 5, **kw)
        bpd = np.concatenate([c.sent[0][0] for c in comms])
        assert np.array_equal(bpd, one["bpd"]), size
    assert len(set(one["bpd"].tolist())) == 3


def test_one_process_scoring_does_not_import_mpi4py(inputs):
    """Without an MPI launcher, evaluate and likelihood run without importing mpi4py."""
    import subprocess

    env = {k: v for k, v in os.environ.items() if k not in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE")}
    runs = [evaluate_args(inputs, inputs / "ev-plain", "clf32.npz"), likelihood_args(inputs, inputs / "lik-plain")]
    code = ("import sys; from refdiff.cli import main; "
            f"codes = [main(a) for a in {runs!r}]; print(codes, 'mpi4py' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.stdout.strip().splitlines()[-1] == "[0, 0] False", out.stderr[-3000:]


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1], sys.argv[2]))
