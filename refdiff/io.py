"""The files a run writes and the directory it writes them in: atomic writes, JSON, the
output-directory check, the one-run-per-directory lock, and the progress line.

Atomic write (`atomic_write`): the content goes to a temporary file with a unique name in
the same directory (`.<name>.<random>.refdiff-tmp`), is flushed and fsync'ed, then renamed
over the target (os.replace is atomic on POSIX) and the directory is fsync'ed. A reader sees
the old file or the new one, never a mix; a write that fails (disk full, an interrupt, a
kill) leaves the old file as it was, and an exception removes the temporary. What a kill -9
leaves behind is removed by the next run in that directory (`clean_temporaries`, called
when the lock is taken). Two writers never share a temporary name.

Run lock (`RunLock`): `<dir>/.refdiff.lock`, held with flock(LOCK_EX | LOCK_NB) for the
run's lifetime and holding the owner's PID. The kernel drops a flock when its process dies,
however it dies, so a lock left by a killed run is free: the next run takes it over (and
says so). The holder removes the file when it releases the lock; a run that opened the file
just before it was removed notices (the inode at the path changed) and starts over. Within
one process the lock is re-entrant, so a command and the library it calls can both hold it.

`prepare_output_dir` creates a directory and proves it writable before any work is done,
so that a bad --out fails in a second, not after the first epoch; `require_memory` does the
same for a result that could never fit in this machine's memory.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import sys
import tempfile
import time

TMP_SUFFIX = ".refdiff-tmp"
LOCK_NAME = ".refdiff.lock"
_LEGACY_TMP = ("checkpoint.npz.tmp", "metrics.json.tmp", "sample.json.tmp", "table.json.tmp")


class OutputDirError(ValueError):
    """An output directory that cannot be used: a file, read-only, not creatable."""


class RunLockedError(ValueError):
    """Another live run holds the lock on this directory."""


# --- atomic writes --------------------------------------------------------------------------------------
_UMASK = None


def _file_mode():
    """0o666 less the process umask: the mode open() would have given the file (mkstemp gives 0o600)."""
    global _UMASK
    if _UMASK is None:
        _UMASK = os.umask(0)
        os.umask(_UMASK)
    return 0o666 & ~_UMASK


def _fsync_dir(directory):
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:          # pragma: no cover - a platform without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:          # pragma: no cover - some filesystems refuse; the rename is done
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(path, mode="wb"):
    """`with atomic_write(path) as f: f.write(...)`: `path` is replaced only if the block
    completes and the data reached the disk. mode "wb" or "w" (text, UTF-8)."""
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_write mode must be 'wb' or 'w'; got {mode!r}")
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".", suffix=TMP_SUFFIX)
    try:
        with os.fdopen(fd, mode, **({} if mode == "wb" else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _file_mode())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if isinstance(exc, OSError) and exc.errno is not None and exc.filename in (None, tmp):
            raise OSError(exc.errno, exc.strerror, path) from exc    # name the file meant, not the temporary
        raise
    _fsync_dir(directory)


def write_json(path, obj):
    """Write `obj` as indented, key-sorted JSON, atomically (NumPy scalars and arrays allowed)."""
    with atomic_write(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=_jsonable)
        f.write("\n")


def write_text(path, text):
    with atomic_write(path, "w") as f:
        f.write(text)


def save_npy(path, array):
    """numpy.save, atomically."""
    import numpy as np
    with atomic_write(path, "wb") as f:
        np.save(f, array, allow_pickle=False)


def _jsonable(o):
    import numpy as np
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def clean_temporaries(directory):
    """Remove the temporaries an interrupted write left in `directory`; -> their names."""
    removed = []
    with contextlib.suppress(OSError):
        for name in os.listdir(directory):
            if (name.startswith(".") and name.endswith(TMP_SUFFIX)) or name in _LEGACY_TMP:
                with contextlib.suppress(OSError):
                    os.remove(os.path.join(directory, name))
                    removed.append(name)
    return removed


# --- the output directory ----------------------------------------------------------------------------------
def prepare_output_dir(path, flag="--out"):
    """Create directory `path` if needed and prove it writable; -> path. OutputDirError if not."""
    path = os.fspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise OutputDirError(f"{flag} {path!r} is a file, not a directory: give a directory (created if missing)")
    try:
        os.makedirs(path, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".write-test.", suffix=TMP_SUFFIX)
        os.close(fd)
        os.remove(probe)
    except OSError as exc:
        why = {errno.EROFS: "it is on a read-only file system", errno.EACCES: "permission denied",
               errno.EPERM: "permission denied", errno.ENOSPC: "the disk is full",
               errno.ENOTDIR: "a part of the path is a file", errno.EEXIST: "a part of the path is a file"}
        raise OutputDirError(f"cannot write to {flag} {path!r}: {why.get(exc.errno, exc.strerror)}; "
                             f"choose a writable directory") from None
    return path


def physical_memory():
    """Bytes of RAM on this machine (None where the platform does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):      # pragma: no cover - not POSIX
        return None


def require_memory(nbytes, what):
    """MemoryError, before any work, if `nbytes` exceed this machine's RAM. `what` says what
    needs them (e.g. "--n 10000000000 images of (1, 28, 28)")."""
    total = physical_memory()
    if total is not None and nbytes > total:
        raise MemoryError(f"{what} need about {nbytes / 2**30:.3g} GiB; this machine has {total / 2**30:.3g} GiB")


# --- one run per directory ------------------------------------------------------------------------------------
_HELD = {}      # realpath of a locked directory -> [fd, depth]


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:      # alive, someone else's
        return True
    return True


def _read_pid(fd):
    with contextlib.suppress(OSError, ValueError, IndexError, UnicodeDecodeError):
        os.lseek(fd, 0, os.SEEK_SET)
        return int(os.read(fd, 64).decode().split()[0])
    return None


class RunLock:
    """`with RunLock(directory):` one run at a time in `directory` (see the module docstring).
    RunLockedError if a live process holds it. `stale_pid`: the PID of a dead run whose lock
    was taken over (None if there was none); `cleaned`: the temporaries it left, removed."""

    def __init__(self, directory):
        self.directory = os.fspath(directory)
        self.path = os.path.join(self.directory, LOCK_NAME)
        self.stale_pid, self.cleaned = None, []

    def acquire(self):
        key = os.path.realpath(self.directory)
        if key in _HELD:
            _HELD[key][1] += 1
            return self
        import fcntl
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pid = _read_pid(fd)
                os.close(fd)
                raise RunLockedError(
                    f"{self.directory!r} is in use by another refdiff run (PID {pid if pid else 'unknown'}): "
                    f"wait for it to finish, or choose another --out") from None
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)             # the previous holder removed the file we opened: start over
        old = _read_pid(fd)
        if old is not None and old != os.getpid() and not _pid_alive(old):
            self.stale_pid = old
        try:
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, f"{os.getpid()}\n".encode())
        except OSError as exc:              # a full disk shows here first: name the file
            os.close(fd)
            with contextlib.suppress(OSError):
                os.remove(self.path)
            raise OSError(exc.errno, exc.strerror, self.path) from None
        _HELD[key] = [fd, 1]
        self.cleaned = clean_temporaries(self.directory)
        return self

    def release(self):
        key = os.path.realpath(self.directory)
        held = _HELD.get(key)
        if held is None:
            return
        held[1] -= 1
        if held[1] == 0:
            del _HELD[key]
            with contextlib.suppress(OSError):
                os.remove(self.path)     # while still holding it: see the module docstring
            os.close(held[0])

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
        return False


@contextlib.contextmanager
def output_run(path, flag="--out", log=None):
    """prepare_output_dir + RunLock for the length of the block; reports a stale lock taken over."""
    path = prepare_output_dir(path, flag)
    with RunLock(path) as lock:
        if log is not None and lock.stale_pid:
            log(f"{path}: took over the lock of run PID {lock.stale_pid}, which is no longer running"
                + (f"; removed its temporaries {lock.cleaned}" if lock.cleaned else ""))
        yield path


# --- progress ------------------------------------------------------------------------------------------------
class Progress:
    """One overwritten status line on a terminal, a plain line every `every` s otherwise."""

    def __init__(self, total, label="", every=5.0, stream=None):
        self.total, self.label, self.every = total, label, every
        self.stream = stream if stream is not None else sys.stderr
        self.start = self.last = time.perf_counter()
        self.tty = self.stream.isatty()

    def update(self, done, **fields):
        now = time.perf_counter()
        if not self.tty and now - self.last < self.every and done < self.total:
            return
        self.last = now
        el = now - self.start
        eta = el / done * (self.total - done) if done else float("nan")
        items = " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in fields.items())
        msg = f"{self.label} {done}/{self.total} {items} elapsed {el:.0f}s eta {eta:.0f}s"
        if self.tty:
            self.stream.write("\r" + msg + " " * 5 + ("\n" if done >= self.total else ""))
        else:
            self.stream.write(msg + "\n")
        self.stream.flush()
