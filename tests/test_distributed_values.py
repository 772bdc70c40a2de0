"""refdiff.distributed's smaller pieces by value: what the MPI communicator's collectives
return on 2 real ranks (one short mpirun), and, in one process with a fake communicator,
where output goes, when the job is aborted and with which code, which GPU a rank takes, the
watchdog's deadline and the time the gradient Allreduce reports.
(tests/test_mpi.py runs training and sampling on 2 ranks against one process.)
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import types

import numpy as np
import pytest

from refdiff import distributed as D

GATHER_SCRIPT = """
import json
import time
import numpy as np
from refdiff.distributed import MPIComm, get_comm
c = get_comm()
assert isinstance(c, MPIComm)
counts = [2, 3]
a = np.arange(counts[c.rank] * 4, dtype=np.float64).reshape(-1, 2, 2) + 100 * c.rank
out = c.gather_rows(a, counts)
buf = np.array([1.0, 2.0]) * (c.rank + 1)
c.allreduce_sum_(buf)
if c.rank == 0:
    time.sleep(0.5)     # rank 1 must wait this long in wait_for_others
t0 = time.perf_counter()
c.wait_for_others()
waited = time.perf_counter() - t0
print("RESULT " + json.dumps(dict(rank=c.rank, size=c.size, gathered=None if out is None else out.tolist(),
                                   allgather=c.allgather(10 * c.rank + 1), reduced=buf.tolist(),
                                   local=c.local_rank(), waited=waited)), flush=True)
c.barrier()
if c.rank == 1:
    c.abort(5)          # MPI_Abort: the whole job ends with this code
time.sleep(60)          # rank 0: killed by rank 1's abort long before
"""


def test_mpicomm_collectives_on_two_ranks():
    # bug caught: Gatherv counts in rows instead of elements (rows of 4 values), ranks'
    # rows out of order, a result on every rank, an Allreduce that is not a sum, a wait that
    # does not wait, an abort that loses its exit code or leaves the other rank waiting
    pytest.importorskip("mpi4py")
    if shutil.which("mpirun") is None:
        pytest.skip("mpirun is not on PATH")
    launch = ["mpirun", "-n", "2", "--oversubscribe"] + (["--allow-run-as-root"] if os.geteuid() == 0 else [])
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    proc = subprocess.run(launch + ["nice", "-n", "10", sys.executable, "-c", GATHER_SCRIPT], capture_output=True,
                          text=True, timeout=120, env=env)
    assert proc.returncode == 5, proc.stderr[-2000:]           # rank 1's MPIComm.abort(5)
    res = {r["rank"]: r for r in (json.loads(line[7:]) for line in proc.stdout.splitlines()
                                  if line.startswith("RESULT "))}
    assert sorted(res) == [0, 1] and res[0]["size"] == 2
    expected = np.concatenate([np.arange(8.0).reshape(2, 2, 2), np.arange(12.0).reshape(3, 2, 2) + 100])
    assert np.array_equal(res[0]["gathered"], expected) and res[1]["gathered"] is None
    for r in (0, 1):
        assert res[r]["allgather"] == [1, 11] and res[r]["reduced"] == [3.0, 6.0]
    assert sorted(res[r]["local"] for r in (0, 1)) == [0, 1]          # both ranks on this machine
    assert res[1]["waited"] >= 0.4                                   # wait_for_others waited for rank 0


def test_single_process_abort_exits_at_once_with_the_code():
    # os._exit: no atexit handler, no cleanup that could wait on other ranks
    code = ("import atexit; from refdiff.distributed import SingleProcess; "
            "atexit.register(lambda: print('atexit ran')); SingleProcess().abort(7)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert (proc.returncode, proc.stdout) == (7, "")


def test_single_process_collectives_are_the_identity():
    c = D.SingleProcess()
    a = np.arange(6.0).reshape(3, 2)
    assert c.gather_rows(a, [3]) is a and c.allgather("x") == ["x"] and c.allreduce_sum_(a) is a
    assert c.local_rank() == 0 and (c.rank, c.size, c.is_root) == (0, 1, True)
    t0 = time.perf_counter()
    assert c.wait_for_others() is None and time.perf_counter() - t0 < 1.0     # nobody to wait for


def test_launched_by_mpi_reads_the_launchers_variables():
    assert D.launched_by_mpi({"OMPI_COMM_WORLD_SIZE": "4"}) == 4
    assert D.launched_by_mpi({"PMI_SIZE": "3"}) == 3
    assert D.launched_by_mpi({"OMPI_COMM_WORLD_SIZE": "", "PMI_SIZE": "2"}) == 2
    assert D.launched_by_mpi({"OMPI_COMM_WORLD_SIZE": "two"}) is None
    assert D.launched_by_mpi({}) is None


class FakeComm:
    def __init__(self, rank=0, size=2, local=0):
        self.rank, self.size, self.is_root, self.local, self.aborted = rank, size, rank == 0, local, []
        self.digests = None

    def abort(self, code=1):
        self.aborted.append(code)

    def local_rank(self):
        return self.local

    def allgather(self, obj, what=None):
        return self.digests

    def allreduce_sum_(self, buf, what=None):
        return buf


class Entered:
    def __init__(self):
        self.entered = False

    def __enter__(self):
        self.entered = True
        return "locked"

    def __exit__(self, *exc):
        return False


def test_on_root_enters_the_context_on_rank_0_only():
    ctx = Entered()
    with D.on_root(ctx, FakeComm(rank=1), "out-dir") as v:
        assert v == "out-dir" and not ctx.entered
    with D.on_root(ctx, FakeComm(rank=0), "out-dir") as v:
        assert v == "locked" and ctx.entered


def test_quiet_unless_root(monkeypatch, capsys):
    monkeypatch.setattr(D, "launched_by_mpi", lambda environ=None: 2)
    monkeypatch.setattr(D, "get_comm", lambda: FakeComm(rank=1))
    with pytest.raises(KeyError), D.quiet_unless_root():
        print("rank 1 out")
        print("rank 1 err", file=sys.stderr)
        raise KeyError("x")
    print("after")                                       # streams restored, even after an error
    assert capsys.readouterr() == ("after\n", "")
    monkeypatch.setattr(D, "get_comm", lambda: FakeComm(rank=0))
    with D.quiet_unless_root():
        print("root speaks")
    assert capsys.readouterr().out == "root speaks\n"


def test_abort_others_only_with_several_ranks(monkeypatch):
    comm = FakeComm(size=2)
    monkeypatch.setattr(D, "get_comm", lambda: comm)
    monkeypatch.setattr(D, "launched_by_mpi", lambda environ=None: None)
    D.abort_others(2)                                     # not under mpirun: nothing
    monkeypatch.setattr(D, "launched_by_mpi", lambda environ=None: 2)
    D.abort_others(0)                                     # success: nothing
    D.abort_others(2)
    assert comm.aborted == [2]
    comm.size = 1
    D.abort_others(1)
    assert comm.aborted == [2]

    def no_mpi():
        raise D.MPIUnavailableError("no mpi4py")
    monkeypatch.setattr(D, "get_comm", no_mpi)
    D.abort_others(2)                                     # the error being reported is the missing MPI


def test_select_gpu_round_robin(monkeypatch):
    used = []
    fake_cupy = types.SimpleNamespace(cuda=types.SimpleNamespace(
        runtime=types.SimpleNamespace(getDeviceCount=lambda: 3),
        Device=lambda d: types.SimpleNamespace(use=lambda: used.append(("cupy", d)))))
    fake_numba = types.SimpleNamespace(cuda=types.SimpleNamespace(
        gpus=[0, 1], select_device=lambda d: used.append(("numba", d))))
    monkeypatch.setitem(sys.modules, "cupy", fake_cupy)
    monkeypatch.setitem(sys.modules, "numba", fake_numba)
    assert D.select_gpu(FakeComm(local=4), "cupy") == 1             # local rank 4 mod 3 GPUs
    assert D.select_gpu(FakeComm(local=3), "numba-cuda") == 1       # 3 mod 2
    assert D.select_gpu(FakeComm(local=3), "numpy") is None
    assert used == [("cupy", 1), ("numba", 1)]


def test_watchdog_aborts_only_past_its_deadline(capfd):
    comm = FakeComm(rank=1, size=2)
    dog = D.Watchdog(comm, 0.3)
    with dog.armed("a quick Allreduce"):
        pass
    time.sleep(0.5)                                       # the disarmed deadline must not fire later
    assert comm.aborted == []
    with dog.armed("the stuck Barrier"):
        deadline = time.monotonic() + 10
        while not comm.aborted and time.monotonic() < deadline:
            time.sleep(0.02)
    assert comm.aborted == [1]
    assert "rank 1 of 2 waited more than 0.3 s in the stuck Barrier" in capfd.readouterr().err
    off = FakeComm(size=2)
    with D.Watchdog(off, 0).armed("x"):                   # 0: no timeout, no thread
        time.sleep(0.05)
    assert off.aborted == []


def test_check_same_state_raises_distributed_error():
    from refdiff.nn import make_model
    m = make_model("mlp", dim=2, widths=(3,), seed=0)
    comm = FakeComm(size=3)
    d = D.state_digest(m)
    comm.digests = [d, d, d]
    D.check_same_state(comm, m)
    comm.digests = [d, "other", d, "other"]
    comm.size = 4
    with pytest.raises(D.DistributedError) as e:
        D.check_same_state(comm, m, where="after epoch 2")
    assert str(e.value) == "the model state of rank(s) [1, 3] differs from rank 0's after epoch 2: the ranks drifted apart"
    assert D.DistributedError.__mro__[1] is RuntimeError    # a runtime failure: exit 1, not bad input


def test_data_parallel_comm_seconds_adds_the_allreduce_time(monkeypatch):
    from refdiff.nn import make_model
    from refdiff.objectives import get_objective

    clock = [0.0]
    monkeypatch.setattr(D.time, "perf_counter", lambda: clock[0])
    comm = FakeComm(size=2)

    def slow_allreduce(buf, what=None):
        clock[0] += 0.25
        return buf
    comm.allreduce_sum_ = slow_allreduce
    m = make_model("gan", z_dim=2, g_hidden=(3,), d_hidden=(3,), seed=0)
    obj = get_objective("gan")(m, {})
    dp = D.DataParallel(comm, obj, "gan")
    assert dp.comm_seconds() == 0.0
    for opt in obj.optimizers().values():                 # G and D: one Allreduce each
        opt.step()
    assert dp.comm_seconds() == 0.5
    assert D.DataParallel(FakeComm(size=1), obj, "gan").comm_seconds() == 0.0
