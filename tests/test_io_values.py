"""refdiff.io and the checkpoint's checks, by value: what each function returns or leaves on
disk, against what the file system says independently (os.listdir, /proc/meminfo, a second
flock on the lock file) or a hand-computed case.

Each test names the bug it is written to catch.
"""
from __future__ import annotations

import fcntl
import io as pyio
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from refdiff import checkpoint, io


# --- clean_temporaries ---------------------------------------------------------------------------------
def test_clean_temporaries_removes_exactly_the_temporaries(tmp_path):
    # bug caught: a pattern too wide (removes a user's file ending in .refdiff-tmp or any
    # dot-file) or too narrow (forgets the legacy names)
    temporaries = {".checkpoint.npz.a1b2.refdiff-tmp", ".metrics.json.zz.refdiff-tmp", "checkpoint.npz.tmp",
                   "metrics.json.tmp"}
    kept = {"keep.refdiff-tmp", ".hidden", "checkpoint.npz", "notes.tmp", ".refdiff-tmp.txt"}
    for name in temporaries | kept:
        (tmp_path / name).write_bytes(b"x")
    removed = io.clean_temporaries(tmp_path)
    assert sorted(removed) == sorted(temporaries)
    assert set(os.listdir(tmp_path)) == kept
    assert io.clean_temporaries(tmp_path / "missing") == []


# --- write_json ------------------------------------------------------------------------------------------
def test_write_json_converts_numpy_and_sorts_keys(tmp_path):
    # bug caught: a NumPy scalar written as the string "0.5" (the str() fallback) or refused,
    # an array as its repr, unsorted keys (diffs between runs), no final newline
    path = tmp_path / "m.json"
    io.write_json(path, {"b": np.float32(0.5), "a": np.arange(3), "c": np.int64(7), "d": tmp_path / "x"})
    expected = {"a": [0, 1, 2], "b": 0.5, "c": 7, "d": str(tmp_path / "x")}
    assert path.read_text() == json.dumps(expected, indent=2, sort_keys=True) + "\n"


# --- prepare_output_dir ----------------------------------------------------------------------------------
def test_prepare_output_dir_creates_and_leaves_nothing(tmp_path):
    # bug caught: the write probe left behind, or a nested path not created
    out = tmp_path / "a" / "b"
    assert io.prepare_output_dir(out) == os.fspath(out)
    assert out.is_dir() and os.listdir(out) == []
    assert io.prepare_output_dir(out) == os.fspath(out)          # an existing directory is fine


def test_prepare_output_dir_refuses_a_file_naming_the_flag(tmp_path):
    f = tmp_path / "f"
    f.write_text("x")
    with pytest.raises(io.OutputDirError, match=r"--samples-dir .* is a file"):
        io.prepare_output_dir(f, flag="--samples-dir")
    with pytest.raises(io.OutputDirError, match="a part of the path is a file"):
        io.prepare_output_dir(f / "sub")
    assert issubclass(io.OutputDirError, ValueError)             # the CLI maps ValueError to exit 2
    assert f.read_text() == "x"


# --- memory ------------------------------------------------------------------------------------------------
@pytest.mark.skipif(not os.path.exists("/proc/meminfo"), reason="needs Linux's /proc/meminfo")
def test_physical_memory_is_memtotal():
    # bug caught: pages without the page size, or available instead of physical memory.
    # MemTotal and sysconf's PHYS_PAGES both read the kernel's totalram.
    with open("/proc/meminfo") as f:
        kb = next(int(line.split()[1]) for line in f if line.startswith("MemTotal:"))
    assert io.physical_memory() == kb * 1024


def test_require_memory_threshold_and_units(monkeypatch):
    # bug caught: >= for >, or GB (1e9) printed as GiB (2^30)
    monkeypatch.setattr(io, "physical_memory", lambda: 4 * 2**30)
    io.require_memory(4 * 2**30, "exactly all of it")            # fits: no error
    with pytest.raises(MemoryError) as e:
        io.require_memory(6 * 2**30, "--n 7 images")
    assert str(e.value) == "--n 7 images need about 6 GiB; this machine has 4 GiB"
    monkeypatch.setattr(io, "physical_memory", lambda: None)     # a platform that does not say: no check
    io.require_memory(2**60, "anything")


# --- RunLock.release and output_run -------------------------------------------------------------------------
def _lock_is_free(path):
    """Can another open file description take the flock? (flock locks belong to the open
    file, so this sees a lock held by this very process.)"""
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def test_runlock_release_counts_nested_holds(tmp_path):
    # bug caught: release dropping the lock at the first of two nested releases (the library
    # would run unlocked inside a command), or never removing the lock file
    lock_path = tmp_path / io.LOCK_NAME
    outer, inner = io.RunLock(tmp_path).acquire(), io.RunLock(tmp_path).acquire()
    inner.release()
    assert lock_path.exists() and not _lock_is_free(lock_path)
    assert lock_path.read_text() == f"{os.getpid()}\n"
    outer.release()
    assert not lock_path.exists()
    assert _lock_is_free(lock_path)
    io.RunLock(tmp_path).release()                               # releasing an unheld lock: nothing


def test_output_run_takes_over_a_dead_runs_lock(tmp_path):
    # bug caught: a stale lock not reported, its temporaries kept, or the lock not released
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / io.LOCK_NAME).write_text(f"{dead.pid}\n")
    (tmp_path / ".samples.npy.q.refdiff-tmp").write_bytes(b"half")
    lines = []
    with io.output_run(tmp_path, log=lines.append) as out:
        assert out == os.fspath(tmp_path)
        assert (tmp_path / io.LOCK_NAME).read_text() == f"{os.getpid()}\n"
    assert lines == [f"{tmp_path}: took over the lock of run PID {dead.pid}, which is no longer running; "
                     f"removed its temporaries ['.samples.npy.q.refdiff-tmp']"]
    assert os.listdir(tmp_path) == []


# --- Progress -------------------------------------------------------------------------------------------------
class _Clock:
    def __init__(self, t):
        self.t = t

    def __call__(self):
        return self.t


class _TTY(pyio.StringIO):
    def isatty(self):
        return True


def test_progress_line_elapsed_eta_and_throttle(monkeypatch):
    # bug caught: eta computed from the done fraction the wrong way round, the throttle
    # dropping the final line, or floats printed unrounded
    clock = _Clock(100.0)
    monkeypatch.setattr(io.time, "perf_counter", clock)
    out = pyio.StringIO()
    p = io.Progress(10, "train", every=5.0, stream=out)
    clock.t = 102.0
    p.update(1, loss=0.5)                                  # 2 s < every and not done: throttled
    assert out.getvalue() == ""
    clock.t = 110.0
    p.update(2, loss=0.123456, step=2)                     # 10 s elapsed for 2 of 10: eta 40 s
    assert out.getvalue() == "train 2/10 loss 0.1235 step 2 elapsed 10s eta 40s\n"
    clock.t = 111.0
    p.update(10)                                           # the last line is never throttled
    assert out.getvalue().splitlines()[-1] == "train 10/10  elapsed 11s eta 0s"


def test_progress_on_a_terminal_overwrites_one_line(monkeypatch):
    clock = _Clock(0.0)
    monkeypatch.setattr(io.time, "perf_counter", clock)
    out = _TTY()
    p = io.Progress(4, "s", stream=out)
    clock.t = 1.0
    p.update(1)                                            # a terminal is never throttled
    clock.t = 4.0
    p.update(4)
    assert out.getvalue() == "\rs 1/4  elapsed 1s eta 3s     \rs 4/4  elapsed 4s eta 0s     \n"


# --- the checkpoint's checks ---------------------------------------------------------------------------------
def test_check_arrays_names_the_first_bad_array():
    # bug caught: integer weights accepted (they would be cast silently on load), NaN in
    # optimizer state missed, bookkeeping counters refused
    good = {"params/w": np.ones(3, np.float32), "ema/__step__": np.array(7), "optim/t": np.array(3),
            "extra/labels": np.arange(4)}
    assert checkpoint.check_arrays(good) is None
    assert checkpoint.check_arrays(dict(good, **{"ema/w": np.arange(3)})) == \
        "array 'ema/w' has dtype int64; weights are floating point (float32 or float64)"
    m = np.array([0.0, np.nan, 1.0, np.inf, 2.0])
    assert checkpoint.check_arrays(dict(good, **{"optim/m": m})) == "array 'optim/m' holds 2 NaN or Inf values of 5"


def test_model_spec_accepts_exactly_the_documented_shape():
    spec = {"name": "mlp", "config": {"dim": 2}, "dtype": "float64"}
    assert checkpoint.model_spec("c.npz", {"model": spec}) is spec
    for bad in ({"name": "mlp", "config": {}, "dtype": "float16"}, {"name": 3, "config": {}, "dtype": "float32"},
                {"name": "mlp", "config": [], "dtype": "float32"}, ["mlp"]):
        with pytest.raises(checkpoint.CheckpointError, match="model spec"):
            checkpoint.model_spec("c.npz", {"model": bad})
    with pytest.raises(checkpoint.CheckpointError, match="records no model"):
        checkpoint.model_spec("c.npz", {})
