"""Every bad input the `refdiff` command can meet ends in one line on stderr that names the
problem and what to do, with exit code 2 (bad input), 1 (a runtime failure: disk full, out of
memory, divergence) or 130 (an interrupt), and no traceback unless --debug / REFDIFF_DEBUG=1.

CASES is one row per bad input, grouped by class: operating-system errors on --out (an
existing file, a read-only directory, a full disk), sizes too large for memory, training that
diverges, an empty data set, --model-arg values that collide with a flag or would be cast,
and every malformed checkpoint (given to `sample` and to `train --resume`). Each row runs
`refdiff.cli.main(argv)` in-process.

The read-only directory and the full disk are simulated in-process (EROFS from every open
under the directory; ENOSPC from os.fsync, where every atomic write fails when a disk is
full). Run as a script, the same table is measured and counted, against real ones where
given (a read-only mount and a nearly full tmpfs):

    REFDIFF_RO_DIR=/mnt/ro REFDIFF_FULL_DIR=/mnt/full64k python tests/test_cli_errors.py
"""
from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import re
import shutil
import sys

import numpy as np
import pytest

HUGE = str(10 ** 10)        # far beyond any machine's memory: an allocation fails at once


# --- fixtures: small real files, and malformed checkpoints built from them -------------------------------------
def _write_raw(path, arrays, meta, fix_manifest=True):
    """Write a checkpoint by hand, bypassing checkpoint.save's checks (a file from elsewhere)."""
    from refdiff import checkpoint
    if fix_manifest and isinstance(meta, dict):
        meta = dict(meta, sha256={k: checkpoint._digest(v) for k, v in arrays.items()})
    blob = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    with open(path, "wb") as f:
        np.savez(f, __meta__=blob, **arrays)


def _flip_central(data, offset, value):
    """Set the byte at `offset` of every central-directory entry (zip headers) to `value`."""
    data = bytearray(data)
    i = data.find(b"PK\x01\x02")
    while i >= 0:
        data[i + offset] = value
        i = data.find(b"PK\x01\x02", i + 4)
    return bytes(data)


def bad_checkpoints(good, root):
    """name -> path of a malformed checkpoint, each built from the real checkpoint `good`."""
    from refdiff import checkpoint
    os.makedirs(root, exist_ok=True)
    arrays, meta = checkpoint.load(good)
    data = open(good, "rb").read()
    out = {}

    def raw(name, content):
        out[name] = os.path.join(root, name + ".npz")
        with open(out[name], "wb") as f:
            f.write(content)

    def rewrite(name, arr=None, **changes):
        out[name] = os.path.join(root, name + ".npz")
        m = json.loads(json.dumps(meta))
        for k, v in changes.items():
            m[k] = v
        _write_raw(out[name], arr or arrays, m, fix_manifest=not isinstance(changes.get("sha256"), list))

    out["npy"] = os.path.join(root, "array.npy")
    np.save(out["npy"], np.zeros(3))
    raw("empty", b"")
    raw("text", b"not a checkpoint\n")
    raw("truncated", data[: len(data) // 2])
    raw("zip-compression", _flip_central(data, 10, 99))           # compression method 99
    raw("zip-encrypted", _flip_central(data, 8, 1))               # flag bit 0: encrypted
    i = data.index(b"{'descr'")
    raw("npy-header", data[:i + 1] + b"'\"(" + data[i + 4:])        # unbalanced quote in the npy header
    out["meta-not-dict"] = os.path.join(root, "meta-list.npz")
    _write_raw(out["meta-not-dict"], arrays, [1, 2], fix_manifest=False)
    rewrite("manifest-list", sha256=[1, 2])
    rewrite("no-model-config", model={"name": meta["model"]["name"], "dtype": "float32"})
    rewrite("model-unknown", model=dict(meta["model"], name="nope"))
    rewrite("model-bad-config", model=dict(meta["model"], config=dict(meta["model"]["config"], widths="abc")))
    rewrite("schedule-list", ddpm_schedule=[1, 2])
    rewrite("schedule-bogus", ddpm_schedule={"bogus": 1})
    rewrite("int32-params", arr={k: (np.round(v).astype(np.int32) if k.startswith("params/") else v)
                                 for k, v in arrays.items()})
    nan = dict(arrays)
    nan["params/out.bias"] = np.full_like(arrays["params/out.bias"], np.nan)
    rewrite("nan-weights", arr=nan)
    out["directory"] = os.path.join(root, "dir.npz")
    os.makedirs(out["directory"], exist_ok=True)
    return out


def _idx(path, shape, dtype_code=0x08):
    header = bytes([0, 0, dtype_code, len(shape)]) + b"".join(int(d).to_bytes(4, "big") for d in shape)
    with open(path, "wb") as f:
        f.write(header)


def make_fixtures(root):
    """Everything the cases need, under `root`; -> dict name -> path."""
    from refdiff.checkpoint import save_model
    from refdiff.cli import main
    from refdiff.data.images import load_images
    from refdiff.nn import make_model

    fx = {"root": root}
    fx["eps_run"] = os.path.join(root, "eps-run")
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        assert main(["train", "--out", fx["eps_run"], "--model", "mlp", "--model-arg", "widths=[8]",
                     "--limit", "16", "--epochs", "1"]) == 0
    fx["eps"] = os.path.join(fx["eps_run"], "checkpoint.npz")
    fx["clf"] = os.path.join(root, "clf.npz")
    save_model(fx["clf"], make_model("classifier", channels=(2, 4), hidden=8, seed=0), kind="classifier")
    fx["gan"] = os.path.join(root, "gan.npz")
    save_model(fx["gan"], make_model("gan", g_hidden=[8], d_hidden=[8], seed=0))
    fx["samples"] = os.path.join(root, "samples.npy")
    np.save(fx["samples"], load_images("mnist5k", "heldout")[0][:10])
    fx["file"] = os.path.join(root, "a-file")
    with open(fx["file"], "w") as f:
        f.write("x\n")
    fx["empty_idx"] = os.path.join(root, "empty-idx")
    os.makedirs(fx["empty_idx"])
    for split in ("train", "t10k"):
        _idx(os.path.join(fx["empty_idx"], f"{split}-images-idx3-ubyte"), (0, 28, 28))
        _idx(os.path.join(fx["empty_idx"], f"{split}-labels-idx1-ubyte"), (0,))
    fx["bad"] = bad_checkpoints(fx["eps"], os.path.join(root, "bad"))
    return fx


# --- the table --------------------------------------------------------------------------------------------------
TINY_TRAIN = ["--model", "mlp", "--model-arg", "widths=[8]", "--limit", "16", "--epochs", "1"]
TINY_RING = ["--train-steps", "20", "--n", "50", "--steps", "5", "--batch", "16", "--no-plot"]
DISK = "no space left|disk is full|Errno 28"


def _out_cases(kind, rc, match):
    """Each command writing into --out, where --out is `kind` (a file, read-only, full)."""
    return [
        (f"{kind}/train", lambda f, o: ["train", "--out", o] + TINY_TRAIN, kind, rc, match),
        (f"{kind}/ring", lambda f, o: ["ring", "--out", o] + TINY_RING, kind, rc, match),
        (f"{kind}/sample", lambda f, o: ["sample", "--checkpoint", f["eps"], "--n", "200", "--sampler", "ddim",
                                         "--steps", "2", "--out", o], kind, rc, match),
        (f"{kind}/evaluate", lambda f, o: ["evaluate", "--samples", f["samples"], "--classifier", f["clf"],
                                           "--out", o], kind, rc, match),
        (f"{kind}/compare", lambda f, o: ["compare", "--gan", f["gan"], "--classifier", f["clf"], "--n", "10",
                                          "--out", o], kind, rc, match),
    ]


CASES = (
    _out_cases("out-is-file", 2, "not a directory|is a file|exists")
    + _out_cases("read-only", 2, "read-only|not writable|cannot write")
    + _out_cases("full-disk", 1, DISK)
    + [
        ("huge/ring-n", lambda f, o: ["ring", "--out", o, "--n", HUGE] + TINY_RING[:2] + TINY_RING[4:], None, 1,
         "memory"),
        ("huge/ring-batch", lambda f, o: ["ring", "--out", o, "--batch", HUGE, "--train-steps", "2"], None, 1,
         "memory"),
        ("huge/sample-n", lambda f, o: ["sample", "--checkpoint", f["eps"], "--n", HUGE, "--out", o], None, 1,
         "memory"),
        ("huge/compare-n", lambda f, o: ["compare", "--gan", f["gan"], "--classifier", f["clf"], "--n", HUGE,
                                         "--out", o], None, 1, "memory"),
        ("diverge/ring-lr-1e6", lambda f, o: ["ring", "--out", o, "--lr", "1e6"] + TINY_RING, None, 1, "diverged"),
        ("diverge/ring-lr-1e3", lambda f, o: ["ring", "--out", o, "--lr", "1e3", "--train-steps", "300", "--n", "50",
                                              "--steps", "5", "--batch", "16", "--no-plot"], None, 1, "diverged"),
        ("diverge/train-lr-1e3", lambda f, o: ["train", "--out", o, "--lr", "1e3", "--batch", "4"] + TINY_TRAIN,
         None, 1, "diverged"),
        ("data/empty-idx", lambda f, o: ["train", "--out", o, "--data", "idx:" + f["empty_idx"], "--model", "mlp"],
         None, 2, "no images|0 images|empty"),
        ("data/limit-empty-idx-heldout", lambda f, o: ["evaluate", "--samples", f["samples"], "--classifier", f["clf"],
                                                       "--data", "idx:" + f["empty_idx"], "--out", o], None, 2,
         "no images|0 images|empty|at least"),
        ("model-arg/dtype", lambda f, o: ["train", "--out", o, "--model-arg", "dtype=float64"] + TINY_TRAIN, None, 2,
         "--dtype"),
        ("model-arg/seed", lambda f, o: ["train", "--out", o, "--model-arg", "seed=5"] + TINY_TRAIN, None, 2,
         "--seed"),
        ("model-arg/backend", lambda f, o: ["train", "--out", o, "--model-arg", "backend=numba"] + TINY_TRAIN, None, 2,
         "--backend"),
        ("model-arg/float-width", lambda f, o: ["train", "--out", o, "--model", "mlp", "--model-arg", "widths=[16.7]",
                                                "--limit", "16", "--epochs", "1"], None, 2, "widths"),
        ("model-arg/bool-width", lambda f, o: ["train", "--out", o, "--model", "mlp", "--model-arg", "widths=[true]",
                                               "--limit", "16", "--epochs", "1"], None, 2, "widths"),
        ("model-arg/vae-float-hidden", lambda f, o: ["train", "--out", o, "--model", "vae", "--model-arg",
                                                     "hidden=[16.7]", "--limit", "16", "--epochs", "1"], None, 2,
         r"hidden=\[16.7\].*would use hidden=\[16\]"),
        ("model-arg/vae-bool-latent", lambda f, o: ["train", "--out", o, "--model", "vae", "--model-arg",
                                                    "latent=true", "--limit", "16", "--epochs", "1"], None, 2,
         "latent=true.*would use latent=1"),
        ("run/ring-existing", lambda f, o: ["ring", "--out", f["ring_run"]] + TINY_RING, None, 2, "--force"),
        ("interrupt/train", lambda f, o: ["train", "--out", o] + TINY_TRAIN, "interrupt", 130, "interrupted"),
        ("interrupt/ring", lambda f, o: ["ring", "--out", o] + TINY_RING, "interrupt", 130, "interrupted"),
        ("pred/unknown", lambda f, o: ["train", "--out", o, "--pred", "score"] + TINY_TRAIN, None, 2, "--pred"),
        ("pred/resume-another", lambda f, o: ["train", "--out", f["eps_run"], "--resume", "--pred", "v"] + TINY_TRAIN,
         None, 2, "pred='eps' there, 'v' now"),
        ("label-dropout/range", lambda f, o: ["train", "--out", o, "--label-dropout", "1"] + TINY_TRAIN, None, 2,
         "--label-dropout"),
        ("label-dropout/unconditional", lambda f, o: ["train", "--out", o, "--label-dropout", "0.1"] + TINY_TRAIN,
         None, 2, "label_dropout.*class-conditional"),
        ("warmup/negative", lambda f, o: ["train", "--out", o, "--warmup", "-5"] + TINY_TRAIN, None, 2, "--warmup"),
        ("lr-schedule/unknown", lambda f, o: ["train", "--out", o, "--lr-schedule", "step"] + TINY_TRAIN, None, 2,
         "--lr-schedule"),
        ("class/unconditional", lambda f, o: ["sample", "--checkpoint", f["eps"], "--class", "3", "--sampler", "ddim",
                                              "--steps", "2", "--out", o], None, 2,
         "--class needs a class-conditional"),
        ("guidance/unconditional", lambda f, o: ["sample", "--checkpoint", f["eps"], "--class", "3", "--guidance", "2",
                                                 "--sampler", "ddim", "--steps", "2", "--out", o], None, 2,
         "--class needs a class-conditional"),
        ("guidance/without-class", lambda f, o: ["sample", "--checkpoint", f["eps"], "--guidance", "2", "--out", o],
         None, 2, "--guidance needs --class"),
        ("guidance/negative", lambda f, o: ["sample", "--checkpoint", f["eps"], "--class", "1", "--guidance", "-1",
                                            "--out", o], None, 2, "--guidance"),
        ("class/not-a-list", lambda f, o: ["sample", "--checkpoint", f["eps"], "--class", "one", "--out", o], None, 2,
         "--class"),
        ("class/inpaint", lambda f, o: ["sample", "--checkpoint", f["eps"], "--class", "1", "--inpaint", f["samples"],
                                        "--from", f["samples"], "--sampler", "em", "--out", o], None, 2,
         "--class and --guidance"),
    ]
    + [(f"checkpoint/sample/{name}", (lambda name: lambda f, o: ["sample", "--checkpoint", f["bad"][name],
                                                                 "--out", o])(name), None, 2, "checkpoint")
       for name in ("npy", "empty", "text", "truncated", "zip-compression", "zip-encrypted", "npy-header",
                    "meta-not-dict", "manifest-list", "no-model-config", "model-unknown", "model-bad-config",
                    "schedule-list", "schedule-bogus", "int32-params", "nan-weights", "directory")]
    + [(f"checkpoint/resume/{name}", (lambda name: lambda f, o: ["train", "--out", f["resume:" + name], "--resume"]
                                      + TINY_TRAIN)(name), None, 2, "checkpoint")
       for name in ("npy", "empty", "truncated", "zip-compression", "zip-encrypted", "npy-header",
                    "meta-not-dict", "manifest-list", "no-model-config", "int32-params", "nan-weights", "directory")]
)


# --- running one case ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _environment(kind, out, patch):
    """Make `out` what the case needs; `patch(obj, name, value)` replaces an attribute for the case."""
    real_ro, real_full = os.environ.get("REFDIFF_RO_DIR"), os.environ.get("REFDIFF_FULL_DIR")
    if kind == "out-is-file":
        with open(out, "w") as f:
            f.write("I am a file\n")
    elif kind == "read-only" and not real_ro:
        import builtins
        prefix = os.path.abspath(out)

        def guard(fn):
            def wrapped(path, *a, **k):
                p = os.path.abspath(os.fspath(path)) if isinstance(path, (str, bytes, os.PathLike)) else ""
                if isinstance(p, str) and (p == prefix or p.startswith(prefix + os.sep)):
                    raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fspath(path))
                return fn(path, *a, **k)
            return wrapped
        for mod, name in ((os, "open"), (os, "mkdir"), (builtins, "open")):
            patch(mod, name, guard(getattr(mod, name)))
    elif kind == "full-disk" and not real_full:
        def fsync(fd):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        patch(os, "fsync", fsync)
    elif kind == "interrupt":
        from refdiff import ring, train

        def stop(*a, **k):
            raise KeyboardInterrupt
        patch(train.Trainer, "fit", stop)
        import refdiff.commands.ring as ring_command
        for module in (ring, ring_command):       # the command may hold its own reference
            if hasattr(module, "train"):
                patch(module, "train", stop)
    yield


def out_dir_for(kind, tmp, name):
    if kind == "read-only" and os.environ.get("REFDIFF_RO_DIR"):
        return os.path.join(os.environ["REFDIFF_RO_DIR"], "run")
    if kind == "full-disk" and os.environ.get("REFDIFF_FULL_DIR"):
        return os.path.join(os.environ["REFDIFF_FULL_DIR"], name.replace("/", "-"))
    return os.path.join(tmp, name.replace("/", "-"))


def run_case(case, fx, tmp, patch):
    """-> (exit code or None, stderr, the exception that escaped main or None)."""
    from refdiff.cli import main
    name, argv, kind, _, _ = case
    out = out_dir_for(kind, tmp, name)
    os.makedirs(tmp, exist_ok=True)
    err = io.StringIO()
    escaped, rc = None, None
    with _environment(kind, out, patch), contextlib.redirect_stderr(err), \
            contextlib.redirect_stdout(io.StringIO()):
        try:
            rc = main(argv(fx, out))
        except SystemExit as exc:
            rc = exc.code
        except BaseException as exc:       # noqa: BLE001 - what escapes main is what the test counts
            escaped = exc
    return rc, err.getvalue(), escaped


def classify(case, rc, err, escaped):
    """'clean' (non-zero exit, one error line, no traceback), 'traceback', 'silent' (exit 0)
    or 'unclear' (some other shape of failure)."""
    if escaped is not None or "Traceback" in err:
        return "traceback"
    if rc == 0:
        return "silent"
    lines = [l for l in err.splitlines() if "error" in l.lower() or "interrupted" in l]
    return "clean" if len(lines) == 1 and rc in (1, 2, 130) else "unclear"


def _prepare(fx):
    """Per-table setup shared by the resume cases: a run directory holding each bad checkpoint."""
    from refdiff.cli import main
    for name, path in fx["bad"].items():
        d = os.path.join(fx["root"], "resume", name)
        os.makedirs(d, exist_ok=True)
        dst = os.path.join(d, "checkpoint.npz")
        if os.path.isdir(path):
            os.makedirs(dst, exist_ok=True)
        else:
            shutil.copyfile(path, dst)
        fx["resume:" + name] = d
    fx["ring_run"] = os.path.join(fx["root"], "ring-run")
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        assert main(["ring", "--out", fx["ring_run"]] + TINY_RING) == 0
    return fx


# --- the test --------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    return _prepare(make_fixtures(str(tmp_path_factory.mktemp("fixtures"))))


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gives_one_clean_line(case, fx, tmp_path, monkeypatch):
    name, _, _, want_rc, match = case
    rc, err, escaped = run_case(case, fx, str(tmp_path), monkeypatch.setattr)
    assert escaped is None, f"{name}: {type(escaped).__name__}: {escaped} escaped main"
    assert "Traceback" not in err, err
    assert rc == want_rc, f"{name}: exit {rc}, expected {want_rc}; stderr: {err}"
    lines = [l for l in err.splitlines() if l.startswith("refdiff")]
    assert len(lines) == 1, f"{name}: expected one 'refdiff ...' line on stderr; got {err!r}"
    assert re.search(match, lines[0], re.I), f"{name}: {lines[0]!r} does not match {match!r}"


@pytest.mark.parametrize("how", ["flag", "env"])
def test_debug_shows_the_traceback(fx, tmp_path, capsys, monkeypatch, how):
    from refdiff.cli import main
    argv = ["sample", "--checkpoint", fx["bad"]["text"], "--out", str(tmp_path)]
    if how == "flag":
        argv = ["--debug"] + argv
    else:
        monkeypatch.setenv("REFDIFF_DEBUG", "1")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "CheckpointError" in err


def test_debug_flag_after_the_command(fx, tmp_path, capsys):
    from refdiff.cli import main
    assert main(["sample", "--debug", "--checkpoint", fx["bad"]["text"], "--out", str(tmp_path)]) == 2
    assert "Traceback" in capsys.readouterr().err


# --- the measurement ----------------------------------------------------------------------------------------
class CaseTimeout(BaseException):
    """A case still running after the measurement's time limit (not an Exception: main must not catch it)."""


def measure(root, limit_s=120, out=sys.stdout):
    """Run the whole table, printing one line per case; -> counts by outcome. A case still
    running after `limit_s` seconds is stopped (SIGALRM) and counted as "hang"."""
    import signal

    def alarm(*_):
        raise CaseTimeout
    signal.signal(signal.SIGALRM, alarm)
    fx = _prepare(make_fixtures(root))
    counts = {}
    for case in CASES:
        undo = []

        def patch(obj, name, value):
            undo.append((obj, name, getattr(obj, name)))
            setattr(obj, name, value)
        signal.alarm(limit_s)
        try:
            rc, err, escaped = run_case(case, fx, os.path.join(root, "out"), patch)
        except CaseTimeout:
            rc, err, escaped = None, "", CaseTimeout(f"still running after {limit_s} s")
        finally:
            signal.alarm(0)
            for obj, name, value in reversed(undo):
                setattr(obj, name, value)
        outcome = "hang" if isinstance(escaped, CaseTimeout) else classify(case, rc, err, escaped)
        counts[outcome] = counts.get(outcome, 0) + 1
        last = (f"{type(escaped).__name__}: {escaped}" if escaped is not None
                else (err.strip().splitlines() or [""])[-1])
        print(f"{outcome:9s} rc={rc!s:4s} {case[0]:40s} {last[:150]}", file=out, flush=True)
    print(f"{len(CASES)} cases: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())), file=out, flush=True)
    return counts


if __name__ == "__main__":
    import tempfile
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    with tempfile.TemporaryDirectory() as root:
        measure(root)
