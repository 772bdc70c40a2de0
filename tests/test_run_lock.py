"""One run per directory (refdiff.io.RunLock): a second process is refused while the first
holds the lock, a lock left by a killed process is taken over, the lock file goes away with
its holder, the temporaries a killed run left are removed by the next run, and `ring`
refuses to overwrite a finished run unless --force."""
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from refdiff.cli import main
from refdiff.io import LOCK_NAME, TMP_SUFFIX, RunLock, RunLockedError

HOLD = textwrap.dedent("""
    import sys, time
    from refdiff.io import RunLock
    RunLock(sys.argv[1]).acquire()
    print("locked", flush=True)
    time.sleep(60)
""")


@pytest.fixture
def holder(tmp_path):
    """Another process holding the lock on tmp_path / "run"; killed with SIGKILL at the end."""
    d = tmp_path / "run"
    d.mkdir()
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(d)], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "locked"
    yield d, p
    p.kill()
    p.wait()


def test_second_process_is_refused_then_takes_over_a_killed_holder(holder, capsys):
    d, p = holder
    with pytest.raises(RunLockedError, match=rf"in use by another refdiff run \(PID {p.pid}\)"):
        RunLock(d).acquire()
    assert main(["train", "--out", str(d), "--model", "mlp", "--model-arg", "widths=[8]", "--limit", "8",
                 "--epochs", "1"]) == 2
    assert f"PID {p.pid}" in capsys.readouterr().err
    assert not (d / "checkpoint.npz").exists()
    os.kill(p.pid, signal.SIGKILL)                     # dies holding it: the kernel drops the flock
    p.wait()
    (d / f".checkpoint.npz.abcd1234{TMP_SUFFIX}").write_bytes(b"half a checkpoint")
    (d / "checkpoint.npz.tmp").write_bytes(b"an older temporary name")
    with RunLock(d) as lock:
        assert lock.stale_pid == p.pid
        assert sorted(lock.cleaned) == sorted([f".checkpoint.npz.abcd1234{TMP_SUFFIX}", "checkpoint.npz.tmp"])
        assert (d / LOCK_NAME).read_text().strip() == str(os.getpid())
    assert os.listdir(d) == []                          # released: the lock file is gone too


def test_two_train_commands_into_one_directory(tmp_path):
    """A second `refdiff train` into the directory of a running one is refused in one line
    (exit 2) and touches nothing; the first finishes and leaves a whole checkpoint."""
    cmd = [sys.executable, "-m", "refdiff", "train", "--out", str(tmp_path), "--model", "mlp", "--model-arg",
           "widths=[64]", "--limit", "4000", "--batch", "8", "--epochs", "1"]
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert first.stdout.readline().startswith("training mlp")          # printed while holding the lock
    # Stopped while it holds the lock, so the second run meets it however fast the first one is.
    os.kill(first.pid, signal.SIGSTOP)
    try:
        second = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=120)
        assert first.poll() is None
    finally:
        os.kill(first.pid, signal.SIGCONT)
    assert second.returncode == 2, second.stderr
    assert "in use by another refdiff run" in second.stderr and "Traceback" not in second.stderr
    assert first.wait(timeout=300) == 0
    from refdiff import checkpoint
    assert checkpoint.load(tmp_path / "checkpoint.npz")[1]["epoch"] == 1
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.npz", "metrics.json"]


def test_lock_is_reentrant_within_a_process(tmp_path):
    with RunLock(tmp_path):
        with RunLock(tmp_path):
            assert (tmp_path / LOCK_NAME).exists()
        assert (tmp_path / LOCK_NAME).exists()          # still held by the outer one
    assert not (tmp_path / LOCK_NAME).exists()


def test_lock_released_when_the_command_fails(tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path), "--model", "mlp", "--model-arg", "seed=3"]) == 2
    assert main(["train", "--out", str(tmp_path), "--model", "mlp", "--model-arg", "widths=[8]", "--limit", "8",
                 "--epochs", "1"]) == 0
    assert not (tmp_path / LOCK_NAME).exists()


def test_ring_refuses_an_existing_run_unless_forced(tmp_path, capsys):
    argv = ["ring", "--out", str(tmp_path), "--train-steps", "5", "--n", "20", "--steps", "3", "--batch", "8",
            "--no-plot"]
    assert main(argv) == 0
    before = (tmp_path / "samples.npy").read_bytes()
    assert main(argv + ["--seed", "1"]) == 2
    err = capsys.readouterr().err
    assert "already holds a ring run" in err and "pass --force" in err
    assert (tmp_path / "samples.npy").read_bytes() == before
    assert main(argv + ["--seed", "1", "--force"]) == 0
    assert (tmp_path / "samples.npy").read_bytes() != before
