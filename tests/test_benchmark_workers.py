"""The benchmarks' one-library-per-process rule (benchmarks/train_step.py): each worker
holds only its own library, and the check that reports it can fail.

A PyTorch step run in a process that also holds numba and threadpoolctl takes ~1.7x as
long as in a clean process, so a worker that quietly imports another implementation's
library makes every ratio of the benchmark wrong without any error.
"""
import os
import sys
import tempfile

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import _common  # noqa: E402
import train_step  # noqa: E402


def test_isolation_flags_a_foreign_library_in_each_kind_of_worker():
    clean = {"numpy": [], "torch": ["torch"], "numba": ["numba", "refdiff_cuda", "threadpoolctl"]}
    assert train_step._isolation(clean) == {}
    dirty = {"numpy": ["numba"], "torch": ["threadpoolctl", "torch"], "numba": ["numba", "torch"],
             "cupy": ["refdiff_cuda", "torch"]}
    assert train_step._isolation(dirty) == {"numpy": ["numba"], "torch": ["threadpoolctl"],
                                            "numba": ["torch"], "cupy": ["torch"]}


def test_each_worker_sets_only_its_own_librarys_threads():
    mem = set(train_step.MALLOC_ENV)
    assert set(train_step._worker_env("numpy", 2)) == {"OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"} | mem
    assert set(train_step._worker_env("torch", 2)) == mem     # torch.set_num_threads inside the worker
    assert train_step._worker_env("numba", 3)["NUMBA_NUM_THREADS"] == "3"
    unset = {k: None for k in train_step.MALLOC_ENV}             # glibc's defaults: inherited settings removed
    assert train_step._worker_env("torch", 2, "default") == unset
    assert train_step._worker_env("numpy", 2, "default") == dict(OPENBLAS_NUM_THREADS="2", OMP_NUM_THREADS="2",
                                                                 MKL_NUM_THREADS="2", **unset)
    assert train_step._worker_env("numba", 2, "default") == dict(NUMBA_NUM_THREADS="2", OPENBLAS_NUM_THREADS="2",
                                                                 REFDIFF_KEEP_MALLOC="1", **unset)


def test_every_worker_gets_the_numba_backends_own_malloc_settings():
    """--malloc same: glibc's environment variables carry the very values configure_memory sets."""
    numba_cpu = pytest.importorskip("refdiff_cuda.numba_cpu")
    settings = {name: value for name, (_, value) in numba_cpu.MALLOC_SETTINGS.items()}
    assert {k: int(v) for k, v in train_step.MALLOC_ENV.items()} == {
        "MALLOC_MMAP_THRESHOLD_": settings["M_MMAP_THRESHOLD"], "MALLOC_TRIM_THRESHOLD_": settings["M_TRIM_THRESHOLD"]}
    for name in ("numpy", "torch", "numba"):
        env = train_step._worker_env(name, 2)
        assert {k: env[k] for k in train_step.MALLOC_ENV} == train_step.MALLOC_ENV


def test_environ_is_restored(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    with train_step._environ({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}):
        assert os.environ["OMP_NUM_THREADS"] == "1" and os.environ["MKL_NUM_THREADS"] == "1"
    assert os.environ["OMP_NUM_THREADS"] == "7" and "MKL_NUM_THREADS" not in os.environ
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "5")
    with train_step._environ({"MALLOC_TRIM_THRESHOLD_": None}):           # None: unset for the worker
        assert "MALLOC_TRIM_THRESHOLD_" not in os.environ
    assert os.environ["MALLOC_TRIM_THRESHOLD_"] == "5"


def test_held_libraries_reads_sys_modules(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", object())
    assert "torch" in _common.held_libraries()
    monkeypatch.delitem(sys.modules, "torch")
    assert "torch" not in _common.held_libraries()


def test_reference_worker_holds_no_other_library():
    """A real spawned reference worker: refdiff's NumPy path must import none of torch,
    numba, refdiff_cuda, threadpoolctl, and its first loss is finite."""
    with tempfile.TemporaryDirectory() as tmp:
        workers, infos, notes = train_step._start_workers(["numpy"], 2, 1, tmp)
        proc, conn = workers["numpy"]
        try:
            held = train_step._ask(conn, "numpy", None, "libraries")
        finally:
            proc.join(timeout=30)
    assert held == [] and notes == {}
    assert infos["numpy"]["first_loss"] > 0


def test_op_profile_restarts_itself_under_the_benchmarks_malloc_settings(monkeypatch):
    """benchmarks/op_profile.py: glibc reads its malloc settings when a process starts, so the
    profile starts itself again with them in its environment when they are missing, and not
    when they are there (no loop)."""
    import op_profile
    calls = []
    monkeypatch.setattr(os, "execve", lambda path, args, env: calls.append((args, env)))
    for k in train_step.MALLOC_ENV:
        monkeypatch.delenv(k, raising=False)
    op_profile._malloc_settings("same", ["--backend", "numpy"])
    (args, env), = calls
    assert args[-2:] == ["--backend", "numpy"] and args[1].endswith("op_profile.py")
    assert {k: env[k] for k in train_step.MALLOC_ENV} == train_step.MALLOC_ENV
    calls.clear()
    for k, v in train_step.MALLOC_ENV.items():
        monkeypatch.setenv(k, v)
    op_profile._malloc_settings("same", [])
    assert calls == []
    op_profile._malloc_settings("default", [])                  # glibc's defaults: the settings removed
    (args, env), = calls
    assert not set(train_step.MALLOC_ENV) & set(env) and env["REFDIFF_KEEP_MALLOC"] == "1"
