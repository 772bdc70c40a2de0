"""Every file a command writes is written whole or not at all (refdiff.io.atomic_write):
a write that fails (the disk full: ENOSPC from fsync, as a full disk gives at the latest
there) leaves the previous file byte for byte and no temporary; two writers of one file
never share a temporary; the files get the usual permissions. Then the commands'
outputs (samples.npy, metrics.json, sample.json, grid.png) through a full disk, and
kill -9 at a random moment of `refdiff train` followed by --resume, bit for bit equal to
an uninterrupted run."""
import errno
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from refdiff import checkpoint, io
from refdiff.cli import main


def _enospc(fd):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("write", [
    lambda p: io.save_npy(p, np.arange(1000.0)),
    lambda p: io.write_json(p, {"a": list(range(100))}),
    lambda p: io.write_text(p, "new text\n"),
], ids=["npy", "json", "text"])
def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch, write):
    path = tmp_path / "out"
    path.write_bytes(b"the previous content")
    monkeypatch.setattr(os, "fsync", _enospc)
    with pytest.raises(OSError) as e:
        write(path)
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(path)     # names the file, not the temporary
    assert path.read_bytes() == b"the previous content"
    assert os.listdir(tmp_path) == ["out"]
    monkeypatch.undo()
    write(path)
    assert path.read_bytes() != b"the previous content" and os.listdir(tmp_path) == ["out"]


def test_exception_inside_the_block_and_interrupt(tmp_path):
    path = tmp_path / "f"
    for exc in (ValueError, KeyboardInterrupt):
        with pytest.raises(exc):
            with io.atomic_write(path) as f:
                f.write(b"half")
                raise exc
        assert os.listdir(tmp_path) == []


def test_two_writers_do_not_share_a_temporary(tmp_path):
    path = tmp_path / "f"
    with io.atomic_write(path) as a, io.atomic_write(path) as b:
        assert a.name != b.name and len(os.listdir(tmp_path)) == 2
        a.write(b"a")
        b.write(b"b")
    assert path.read_bytes() == b"a" and os.listdir(tmp_path) == ["f"]     # the last rename wins, whole


def test_mode_follows_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        io._UMASK = None
        io.write_text(tmp_path / "f", "x")
        assert (tmp_path / "f").stat().st_mode & 0o777 == 0o640
    finally:
        os.umask(old)
        io._UMASK = None


def test_sample_command_on_a_full_disk(tmp_path, monkeypatch, capsys):
    """A full disk during `refdiff sample` leaves the previous samples.npy whole (it once left
    a truncated one) and exits 1 with one line."""
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), "--model", "mlp", "--model-arg", "widths=[8]", "--limit", "8",
                 "--epochs", "1"]) == 0
    argv = ["sample", "--checkpoint", str(run / "checkpoint.npz"), "--n", "4", "--sampler", "ddim", "--steps", "2",
            "--out", str(tmp_path / "s")]
    assert main(argv) == 0
    before = {f: (tmp_path / "s" / f).read_bytes() for f in os.listdir(tmp_path / "s")}
    assert sorted(before) == ["grid.png", "sample.json", "samples.npy"]
    monkeypatch.setattr(os, "fsync", _enospc)
    capsys.readouterr()
    assert main(argv + ["--seed", "1"]) == 1
    err = capsys.readouterr().err
    assert "no space left on device writing" in err and "samples.npy" in err
    assert {f: (tmp_path / "s" / f).read_bytes() for f in os.listdir(tmp_path / "s")} == before


def test_metrics_json_is_whole_after_a_failed_save(tmp_path, monkeypatch):
    from refdiff.train import TrainConfig, Trainer
    cfg = TrainConfig(model="mlp", model_args={"widths": [8]}, limit=8, epochs=1)
    Trainer(cfg, tmp_path, log=lambda s: None).fit()
    before = (tmp_path / "metrics.json").read_bytes(), (tmp_path / "checkpoint.npz").read_bytes()
    monkeypatch.setattr(os, "fsync", _enospc)
    t = Trainer(TrainConfig(**dict(cfg.__dict__, epochs=2)), tmp_path, resume=True, log=lambda s: None)
    with pytest.raises(OSError):
        t.fit()
    assert ((tmp_path / "metrics.json").read_bytes(), (tmp_path / "checkpoint.npz").read_bytes()) == before
    json.loads(before[0])
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.npz", "metrics.json"]


# --- kill -9, then --resume ----------------------------------------------------------------------------
TRAIN = [sys.executable, "-m", "refdiff", "train", "--model", "mlp", "--model-arg", "widths=[32]", "--limit", "3000",
         "--batch", "8", "--epochs", "4"]


def test_kill_9_then_resume_is_bit_for_bit(tmp_path):
    """kill -9 a run at a moment drawn at random after its first checkpoint, resume it, and
    every array of the final checkpoint equals the uninterrupted run's; the killed run's
    temporary (if the kill fell inside a write) is removed by the resumed one."""
    subprocess.run(TRAIN + ["--out", str(tmp_path / "a")], check=True, capture_output=True, timeout=300)
    b = tmp_path / "b"
    p = subprocess.Popen(TRAIN + ["--out", str(b)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (b / "checkpoint.npz").exists() and time.time() < deadline and p.poll() is None:
        time.sleep(0.01)
    time.sleep(np.random.default_rng().uniform(0, 0.8))
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert (b / "checkpoint.npz").exists()
    epoch = checkpoint.load(b / "checkpoint.npz")[1]["epoch"]
    r = subprocess.run(TRAIN + ["--out", str(b), "--resume"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert epoch == 4 or f"after epoch {epoch}" in r.stderr
    (xa, ma), (xb, mb) = checkpoint.load(tmp_path / "a" / "checkpoint.npz"), checkpoint.load(b / "checkpoint.npz")
    assert ma["epoch"] == mb["epoch"] == 4 and sorted(xa) == sorted(xb)
    for k in xa:
        assert np.array_equal(xa[k], xb[k]), k
    assert sorted(os.listdir(b)) == ["checkpoint.npz", "metrics.json"]


def test_ctrl_c_says_what_is_on_disk_and_leaves_no_temporary(tmp_path):
    """SIGINT during `refdiff train`: exit 130, one line naming the intact checkpoint, the lock
    released and no temporary left (the interrupt may fall inside a write)."""
    p = subprocess.Popen(TRAIN + ["--out", str(tmp_path)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (tmp_path / "checkpoint.npz").exists() and time.time() < deadline and p.poll() is None:
        time.sleep(0.01)
    time.sleep(np.random.default_rng().uniform(0, 0.3))
    p.send_signal(signal.SIGINT)
    err = p.communicate(timeout=120)[1]
    if p.returncode == 0:
        pytest.skip("the run ended before the interrupt")
    assert p.returncode == 130, err
    epoch = checkpoint.load(tmp_path / "checkpoint.npz")[1]["epoch"]
    lines = [l for l in err.splitlines() if l.startswith("refdiff")]
    assert lines == [f"refdiff train: interrupted; the checkpoint of epoch {epoch} is intact in "
                     f"{tmp_path / 'checkpoint.npz'} (the last finite state): continue with --resume"], err
    assert "Traceback" not in err
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.npz", "metrics.json"]
