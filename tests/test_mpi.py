"""refdiff.distributed on 2 MPI ranks, launched from pytest (`mpirun -n 2 --oversubscribe`,
plus `--allow-run-as-root` as root), against the same code run in one process here.

- training: 10 Adam steps of unet-small (eps objective, Ho et al.'s loss) at global batch
  B = 5 (shares 2 and 3: the b_r / B weighting is exercised) over 2 epochs of 23 images (the
  last batch of each epoch holds 3: shares 1 and 2), 2 ranks vs 1 process:
    float64: ||theta_2 - theta_1|| <= 1e-12 ||theta_1||, and every tensor within 1e-12 x its
             max |value| (the only difference is the order of the gradient sum: a few ulps
             per step, 10 steps of Adam); the same for the VAE (a summed loss), the GAN (two
             optimizers) and the classifier (draws with the batch on axis 1), norm-wise;
    float32: the distance between the 2-rank and the 1-process parameters is at most 4 x
             the float32 run's own error against the float64 run (the suite's float32 rule,
             refdiff_cuda.testing.check_op: slack of 4x the reference's own float32 error);
  and the ranks' parameters, EMA and Adam moments are identical (state_digest).
- sampling: DDIM with eta = 1 (fresh noise every step) of 5 images on 2 ranks (2 + 3) equals
  the 5 images drawn in one process, in one batch, with the same seed.
- faults: rank 1 raises at step 3 / is killed by SIGKILL / hangs (with a 3 s collective
  timeout) -> both ranks exit non-zero within FAULT_BOUND_S, the message names the rank, and
  the checkpoint rank 0 wrote after step 2 is intact (it equals one process's state).
- in one process: the shards' draws against the global draw, the per-image streams, the
  weighted gradient sum, the refusals, abort_on_error, and that mpi4py is not imported.

Run as a script (`python tests/test_mpi.py MODE OUT`) it is the program each rank runs.
"""
from __future__ import annotations

import functools
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

HERE = os.path.abspath(__file__)
N_TRAIN, BATCH, STEPS = 23, 5, 10
RUNS = [("unet-small", "float64"), ("unet-small", "float32"), ("vae", "float64"), ("gan", "float64"),
        ("classifier", "float64")]
FAULT_BOUND_S = 60      # MPI start (~2 s) + 3 steps + abort; a hang would run to the subprocess timeout


# --- the program of each rank -------------------------------------------------------------------------------
def train_run(comm, dtype, name="unet-small", steps=STEPS, fail_rank=None, ckpt=None):
    """`steps` updates of model `name` on N_TRAIN fixed random images (labels k mod 10), epoch
    e ordered by default_rng([0, e]) as refdiff.train.Trainer does. -> (params, ema, metric
    sums over the examples seen)."""
    from refdiff.distributed import DataParallel, check_same_state
    from refdiff.io import save_npy
    from refdiff.nn import make_model
    from refdiff.objectives import get_objective

    model = make_model(name, dtype=np.dtype(dtype), seed=0)
    obj = get_objective(model.kind)(model, {})
    dp = DataParallel(comm, obj, model.kind)
    x, y = np.random.default_rng(123).uniform(-1, 1, (N_TRAIN, 1, 28, 28)), np.arange(N_TRAIN) % 10
    done, sums, e = 0, {}, 0
    while done < steps:
        rng = np.random.default_rng([0, e])
        order = rng.permutation(N_TRAIN)
        for s in range(0, N_TRAIN, BATCH):
            if done == steps:
                break
            if fail_rank == comm.rank and done == 2:
                raise RuntimeError("injected failure")
            if fail_rank == -1 and done == 2:        # as a kill -9 from outside
                os.kill(os.getpid(), signal.SIGKILL)
            if fail_rank == -2 and done == 2:        # hangs without dying
                time.sleep(3600)
            idx, local_rng = dp.shard(order[s:s + BATCH], rng)
            out = obj.step(model.ops.asarray(x[idx].astype(model.dtype)), y[idx], local_rng)
            for k, v in out.items():
                sums[k] = sums.get(k, 0.0) + float(v) * len(idx)
            done += 1
            if ckpt and done == 2:              # rank 0 writes; the failure comes after the write
                if comm.is_root:
                    save_npy(ckpt, model.ops.to_numpy(next(iter(model.params.values()))))
                comm.barrier()
        e += 1
    check_same_state(comm, model, obj, where=f"after {steps} steps")
    params = {k: model.ops.to_numpy(v) for k, v in model.params.items()}
    ema = getattr(obj, "ema", None)
    ema = {k: model.ops.to_numpy(v) for k, v in ema.shadow.items()} if ema is not None else {}
    return params, ema, dp.sum_metrics(sums) if comm.size > 1 else sums


def sample_run(comm, n=5, seed=7):
    from refdiff import ddpm
    from refdiff.distributed import sample_split
    from refdiff.nn import make_model
    from refdiff.sde import DDPMSchedule

    model = make_model("unet-small", dtype=np.float64, seed=1)
    schedule = DDPMSchedule(num_steps=100)

    def draw(count, rng):
        return ddpm.ddim(model, schedule, (count, 1, 28, 28), rng, steps=4, eta=1.0)
    return sample_split(comm, draw, n, seed)


def _main(mode, out):
    from refdiff.distributed import abort_on_error, get_comm

    comm = get_comm()
    with abort_on_error(comm):
        if mode == "train":
            res = {f"{name}/{dt}": train_run(comm, dt, name) for name, dt in RUNS}
            if comm.is_root:
                np.savez(out, ranks=comm.size, **{f"{run}/{part}/{k}": v for run, r in res.items()
                                                  for part, d in zip(("params", "ema", "sums"), r)
                                                  for k, v in d.items()})
        elif mode == "sample":
            x = sample_run(comm)
            local = comm.allgather(comm.local_rank())
            if comm.is_root:
                np.save(out, x)
                np.save(str(out) + ".local.npy", np.array(local))
        elif mode == "fault":
            train_run(comm, "float64", steps=6, fail_rank=1, ckpt=out)
        elif mode == "kill":
            train_run(comm, "float64", steps=6, fail_rank=-1 if comm.rank else None, ckpt=out)
        elif mode == "hang":
            train_run(comm, "float64", steps=6, fail_rank=-2 if comm.rank else None, ckpt=out)
    return 0


# --- the tests ----------------------------------------------------------------------------------------------
def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")


def _mpirun_cmd(cmd, ranks=2, timeout=120, env=None):
    """`mpirun -n ranks --oversubscribe [--allow-run-as-root] nice cmd` -> (process, seconds);
    skips the test without mpi4py or mpirun."""
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        pytest.skip("mpi4py is not installed (pip install 'refdiff[mpi]')")
    if shutil.which("mpirun") is None:
        pytest.skip("mpirun is not on PATH (pip install 'refdiff[mpi]' provides it)")
    launch = ["mpirun", "-n", str(ranks), "--oversubscribe"] + (["--allow-run-as-root"] if os.geteuid() == 0 else [])
    t0 = time.perf_counter()
    proc = subprocess.run(launch + ["nice", "-n", "10"] + cmd, capture_output=True, text=True, timeout=timeout,
                          env=dict(_env(), **(env or {})))
    return proc, time.perf_counter() - t0


def _mpirun(mode, out, timeout=120, env=None):
    return _mpirun_cmd([sys.executable, HERE, mode, str(out)], timeout=timeout, env=env)


@pytest.fixture(scope="module")
def ranks_run(tmp_path_factory):
    """Every run of RUNS on 2 ranks (one mpirun), as saved by rank 0."""
    out = tmp_path_factory.mktemp("mpi") / "ranks.npz"
    proc, _ = _mpirun("train", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = dict(np.load(out))
    assert int(res["ranks"]) == 2          # the ranks saw each other: not two single processes
    return res


def _assert_float64_agree(got, run, ref, per_tensor):
    """||theta_2 - theta_1|| <= 1e-12 ||theta_1|| over all parameters, and over the EMA (the
    issue's measure); with `per_tensor` also every tensor's max |difference| <= 1e-12 x its
    max |value|. Metric sums within 1e-12 relative."""
    for part, d in zip(("params", "ema"), ref[:2]):
        if part == "ema" and not d:
            continue                        # the VAE and the GAN keep no EMA
        num = sum(np.sum((got[f"{run}/{part}/{k}"] - v) ** 2) for k, v in d.items())
        rel = np.sqrt(num / sum(np.sum(v ** 2) for v in d.values()))
        print(f"{run} {part}: relative difference (norm) {rel:.3g}")
        assert rel <= 1e-12, f"{run} {part}: ||2 ranks - 1 process|| / ||1 process|| = {rel:.3g} > 1e-12"
        for k, v in d.items() if per_tensor else ():
            diff, scale = np.max(np.abs(got[f"{run}/{part}/{k}"] - v)), np.max(np.abs(v))
            assert diff <= 1e-12 * scale, f"{run} {part} {k}: difference {diff:.3g} > 1e-12 x {scale:.3g}"
    for k, v in ref[2].items():
        assert abs(float(got[f"{run}/sums/{k}"]) - v) <= 1e-12 * max(abs(v), 1.0), f"{run} metric {k}"


def test_two_ranks_reproduce_one_process_unet(ranks_run):
    from refdiff.distributed import SingleProcess

    ref = {dt: train_run(SingleProcess(), dt) for dt in ("float64", "float32")}
    _assert_float64_agree(ranks_run, "unet-small/float64", ref["float64"], per_tensor=True)
    # float32: within 4x the float32 run's own error against float64 (module docstring)
    p64, p32 = ref["float64"][0], ref["float32"][0]
    own = np.sqrt(sum(np.sum((p32[k].astype(np.float64) - p64[k]) ** 2) for k in p64))
    diff = np.sqrt(sum(np.sum((ranks_run[f"unet-small/float32/params/{k}"].astype(np.float64) - p32[k]) ** 2)
                       for k in p64))
    print(f"float32: 2 ranks vs 1 process {diff:.3g}, float32 vs float64 {own:.3g}")
    assert own > 0, "the float32 run equals the float64 run: the float32 bound would be vacuous"
    assert diff <= 4 * own, f"float32: 2 ranks vs 1 process {diff:.3g} > 4 x float32's own error {own:.3g}"


@pytest.mark.parametrize("name", ["vae", "gan", "classifier"])
def test_two_ranks_reproduce_one_process_other_kinds(ranks_run, name):
    """The sum-reduced VAE loss, the GAN's two optimizers, the classifier's (2, B) shift draws.
    Norm-wise only: per tensor the VAE's first layer differs by up to ~8e-12 of its max (a
    few elements; Adam divides each gradient by its own sqrt(v) + eps, so an element whose
    shares' gradients nearly cancel carries their rounding into the update)."""
    from refdiff.distributed import SingleProcess

    _assert_float64_agree(ranks_run, f"{name}/float64", train_run(SingleProcess(), "float64", name), per_tensor=False)


def test_two_ranks_sample_the_same_images(tmp_path):
    from refdiff.distributed import SingleProcess

    proc, _ = _mpirun("sample", tmp_path / "x.npy")
    assert proc.returncode == 0, proc.stderr[-3000:]
    got, ref = np.load(tmp_path / "x.npy"), sample_run(SingleProcess())
    assert got.shape == ref.shape == (5, 1, 28, 28)
    # the same images: equal to float64 rounding (model calls on batches of 2 and 3 vs 5)
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-12)
    assert np.std(ref[:, 0, 0, 0]) > 0.1      # distinct images: the streams differ per image
    assert list(np.load(str(tmp_path / "x.npy") + ".local.npy")) == [0, 1]   # one machine: local ranks 0, 1


@functools.lru_cache(maxsize=None)
def _after_two_steps():
    from refdiff.distributed import SingleProcess

    return next(iter(train_run(SingleProcess(), "float64", steps=2)[0].values()))


def _assert_checkpoint_after_two_steps(path):
    """The tensor rank 0 wrote (atomically) after step 2 is complete: it is the one process's
    first parameter after 2 steps, to the float64 agreement of the training test."""
    ref = _after_two_steps()
    w = np.load(path)
    assert w.shape == ref.shape and np.max(np.abs(w - ref)) <= 1e-12 * np.max(np.abs(ref))


@pytest.mark.parametrize("mode, env, what, message", [
    ("fault", None, "one rank failed", "rank 1 of 2 stopped (RuntimeError: injected failure)"),
    ("kill", None, "one rank was killed", None),
    ("hang", {"REFDIFF_COLLECTIVE_TIMEOUT": "3"}, "one rank hung",
     "rank 0 of 2 waited more than 3 s in the gradient Allreduce"),
])
def test_a_failing_rank_stops_the_job(tmp_path, mode, env, what, message):
    """One rank raises, is SIGKILLed, or hangs (ended by a 3 s collective timeout): the job
    exits non-zero within FAULT_BOUND_S, saying why where a rank can, and the checkpoint
    rank 0 wrote before the fault is intact."""
    ckpt = tmp_path / "ckpt.npy"
    proc, seconds = _mpirun(mode, ckpt, timeout=FAULT_BOUND_S + 60, env=env)
    print(f"{mode}: exit {proc.returncode} after {seconds:.1f} s")
    assert proc.returncode != 0
    assert seconds < FAULT_BOUND_S, f"the job took {seconds:.0f} s to stop after {what}"
    if message is not None:
        assert message in proc.stderr, proc.stderr[-3000:]
    _assert_checkpoint_after_two_steps(ckpt)


def test_collective_timeout_setting(monkeypatch):
    from refdiff.distributed import COLLECTIVE_TIMEOUT_S, collective_timeout

    monkeypatch.delenv("REFDIFF_COLLECTIVE_TIMEOUT", raising=False)
    assert collective_timeout() == COLLECTIVE_TIMEOUT_S
    monkeypatch.setenv("REFDIFF_COLLECTIVE_TIMEOUT", "0")
    assert collective_timeout() == 0
    for bad in ("soon", "-1", "nan"):
        monkeypatch.setenv("REFDIFF_COLLECTIVE_TIMEOUT", bad)
        with pytest.raises(ValueError, match="REFDIFF_COLLECTIVE_TIMEOUT"):
            collective_timeout()


# --- the commands under mpirun -----------------------------------------------------------------------------
CLI_TRAIN = ["train", "--data", "mnist5k", "--limit", "10", "--model", "unet-small", "--dtype", "float64",
             "--batch", "4"]           # batches of 4, 4, 2: every rank gets at least one image


def _refdiff(args, ranks=1, timeout=120, mpirun=False):
    cmd = [sys.executable, "-m", "refdiff"] + [str(a) for a in args]
    if ranks > 1 or mpirun:
        return _mpirun_cmd(cmd, ranks, timeout)[0]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env())


def test_gradient_clipping_on_two_ranks_is_one_process_clipping(tmp_path):
    """--grad-clip small enough to clip every step: 2 ranks clip the averaged gradient, so 2
    epochs on 2 ranks equal 2 epochs in one process (float64, 1e-12 norm-wise)."""
    from refdiff.checkpoint import load

    clip = ["--grad-clip", "0.01", "--epochs", "2"]
    for ranks, out in ((2, tmp_path / "two"), (1, tmp_path / "one")):
        p = _refdiff(CLI_TRAIN + clip + ["--out", out], ranks=ranks)
        assert p.returncode == 0, p.stderr[-3000:]
    (ta, _), (tb, _) = load(tmp_path / "two" / "checkpoint.npz"), load(tmp_path / "one" / "checkpoint.npz")
    keys = [k for k in tb if k.startswith("params/") and tb[k].dtype.kind == "f"]
    rel = np.sqrt(sum(np.sum((ta[k] - tb[k]) ** 2) for k in keys) / sum(np.sum(tb[k] ** 2) for k in keys))
    assert rel <= 1e-12, rel


def test_refdiff_train_and_sample_on_two_ranks(tmp_path):
    """`mpirun -n 2 refdiff train` for epoch 1, then `refdiff train --resume` in 1 process for
    epoch 2 = 2 epochs in 1 process (float64: parameters, EMA and Adam moments within 1e-12
    norm-wise, the per-epoch losses too); a resume with another --batch is one error (exit
    2) on 2 ranks; `mpirun -n 2 refdiff sample` writes the images `mpirun -n 1` writes."""
    from refdiff.checkpoint import load

    a, b = tmp_path / "a", tmp_path / "b"
    p = _refdiff(CLI_TRAIN + ["--epochs", "1", "--out", a], ranks=2)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.count("epoch 1: loss") == 1          # rank 0 reports for both
    p = _refdiff(CLI_TRAIN[:-1] + ["5", "--epochs", "2", "--out", a, "--resume"], ranks=2)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "refdiff train: error: cannot resume" in p.stderr and "batch=4 there, 5 now" in p.stderr
    for args in (CLI_TRAIN + ["--epochs", "2", "--out", a, "--resume"], CLI_TRAIN + ["--epochs", "2", "--out", b]):
        p = _refdiff(args)
        assert p.returncode == 0, p.stderr[-3000:]
    (ta, ma), (tb, mb) = load(a / "checkpoint.npz"), load(b / "checkpoint.npz")
    for section in ("params/", "ema/", "optim/"):
        keys = [k for k in tb if k.startswith(section) and tb[k].dtype.kind == "f"]
        rel = np.sqrt(sum(np.sum((ta[k] - tb[k]) ** 2) for k in keys) / sum(np.sum(tb[k] ** 2) for k in keys))
        assert rel <= 1e-12, f"{section}: {rel:.3g}"
    assert [h["epoch"] for h in ma["history"]] == [1, 2]
    for ha, hb in zip(ma["history"], mb["history"]):
        assert abs(ha["loss"] - hb["loss"]) <= 1e-12 * abs(hb["loss"])
    # --batch 2 < a rank's share (2 or 3 images): the share is drawn in chunks, each with its images' streams
    flags = ["sample", "--checkpoint", a / "checkpoint.npz", "--n", "5", "--sampler", "ddim", "--steps", "3",
             "--eta", "1", "--batch", "2"]
    for ranks in (1, 2):
        p = _refdiff(flags + ["--out", tmp_path / f"s{ranks}"], ranks=ranks, mpirun=True)
        assert p.returncode == 0, p.stderr[-3000:]
    s1, s2 = np.load(tmp_path / "s1" / "samples.npy"), np.load(tmp_path / "s2" / "samples.npy")
    assert s1.shape == (5, 1, 28, 28) and np.std(s1) > 0.1
    # float32 files of float64 images that agree to ~1e-12 (the model runs on 2 + 3 images vs 5): a
    # float32 rounding may differ by one ulp (6e-8 at |x| <= 1)
    np.testing.assert_allclose(s2, s1, rtol=0, atol=1e-6)
    p = _refdiff(["sample", "--checkpoint", a / "checkpoint.npz", "--n", "5", "--sampler", "dpm2m", "--steps", "3",
                  "--batch", "2", "--out", tmp_path / "d2"], ranks=2)
    assert p.returncode == 0, p.stderr[-3000:]
    p = _refdiff(["sample", "--checkpoint", a / "checkpoint.npz", "--n", "5", "--sampler", "dpm2m", "--steps", "3",
                  "--batch", "2", "--out", tmp_path / "d1"], ranks=1, mpirun=True)
    assert p.returncode == 0, p.stderr[-3000:]
    np.testing.assert_allclose(np.load(tmp_path / "d2" / "samples.npy"), np.load(tmp_path / "d1" / "samples.npy"),
                               rtol=0, atol=1e-6)


# --- in one process (no mpirun): the pieces, against direct computations -----------------------------------
class FakeComm:
    """Rank `rank` of `size`; its Allreduce adds `other` (the buffer of the other ranks)."""

    def __init__(self, rank=0, size=2, other=None):
        self.rank, self.size, self.is_root, self.other, self.aborted = rank, size, rank == 0, other, None

    def allreduce_sum_(self, buf, what=None):
        buf += self.other
        return buf

    def abort(self, code=1):
        self.aborted = code


def test_single_process_path_does_not_import_mpi4py():
    env = {k: v for k, v in os.environ.items() if k not in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE")}
    code = ("import sys, refdiff.distributed as d; c = d.get_comm(); "
            "print(type(c).__name__, c.rank, c.size, 'mpi4py' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert out.stdout.split() == ["SingleProcess", "0", "1", "False"], out.stderr


def test_launcher_without_mpi4py_is_one_clear_error(monkeypatch):
    from refdiff import distributed

    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "2")
    monkeypatch.setitem(sys.modules, "mpi4py", None)       # import mpi4py -> ImportError
    monkeypatch.setattr(distributed, "_COMM", None)
    with pytest.raises(distributed.MPIUnavailableError, match=r"world size 2.*pip install 'refdiff\[mpi\]'"):
        distributed.get_comm()


@pytest.mark.parametrize("axis, block_shape, k", [(0, (3,), 1), (0, (2,), 3), (1, (), 1)])
def test_shards_draw_the_rows_of_the_global_draw(axis, block_shape, k):
    """For every N and B >= N, the shares' draws laid side by side are the global draws."""
    from refdiff.distributed import ShardedGenerator, share_bounds

    for B in range(1, 8):
        shape = (2, B) if axis == 1 else (k * B,) + block_shape
        g = np.random.default_rng(9)
        ref = [g.integers(0, 9, size=shape), g.standard_normal(shape), g.uniform(-1, 2, size=shape),
               g.normal(1, 3, size=shape), g.random(shape), g.standard_normal()]
        for N in range(1, B + 1):
            parts = []
            for r in range(N):
                lo, hi = share_bounds(B, r, N)
                s = ShardedGenerator(np.random.default_rng(9), B, lo, hi, axis)
                sh = (2, hi - lo) if axis == 1 else (k * (hi - lo),) + block_shape
                parts.append([s.integers(0, 9, size=sh), s.standard_normal(sh), s.uniform(-1, 2, size=sh),
                              s.normal(1, 3, size=sh), s.random(sh), s.standard_normal()])
            for j, want in enumerate(ref[:-1]):
                if axis == 1:
                    got = np.concatenate([p[j] for p in parts], axis=1)
                else:     # block m of the global draw holds rows m B + [0, B): rank r's rows of each block
                    got = np.concatenate([p[j].reshape((k, -1) + block_shape) for p in parts], axis=1)
                    got = got.reshape(shape)
                assert np.array_equal(got, want), (B, N, j)
            assert all(p[-1] == ref[-1] for p in parts)       # a draw without a batch axis passes through


def test_image_streams_do_not_depend_on_the_split():
    from refdiff.distributed import ImageStreams

    whole = ImageStreams(4, range(5)).standard_normal((5, 3))
    assert np.array_equal(ImageStreams(4, [2, 3]).standard_normal((2, 3)), whole[2:4])
    assert np.array_equal(whole[1], np.random.default_rng([4, 1]).standard_normal(3))
    with pytest.raises(ValueError, match="one row per image"):
        ImageStreams(4, range(5)).standard_normal((4, 3))
    with pytest.raises(ValueError, match="one row per image"):
        ImageStreams(4, range(5)).uniform()


def test_gradient_allreduce_weights_sums_and_unflattens():
    from refdiff.distributed import GradientAllreduce
    from refdiff.nn import make_model

    m = make_model("mlp", dim=3, dtype=np.float64)
    rng = np.random.default_rng(0)
    for g in m.grads.values():
        g[...] = rng.standard_normal(g.shape)
    mine = {k: g.copy() for k, g in m.grads.items()}
    other = {k: rng.standard_normal(g.shape) for k, g in m.grads.items()}     # rank 1's b_1 g_1
    flat = np.concatenate([other[k].ravel() for k in m.params])
    GradientAllreduce(FakeComm(other=flat), m)(weight=2, divide=5)
    for k, g in m.grads.items():
        np.testing.assert_allclose(g, (2 * mine[k] + other[k]) / 5, rtol=1e-15, atol=0)


def test_data_parallel_refuses_what_it_cannot_split():
    from refdiff.distributed import DataParallel
    from refdiff.nn import make_model
    from refdiff.objectives import EpsObjective

    m = make_model("mlp", dim=3)
    with pytest.raises(ValueError, match="kind 'ring'"):
        DataParallel(FakeComm(), EpsObjective(m, {}), "ring")
    dp = DataParallel(FakeComm(rank=1, size=3), EpsObjective(m, {}), "eps")
    with pytest.raises(ValueError, match="batch of 2 examples cannot be split over 3 ranks"):
        dp.shard(np.arange(2), np.random.default_rng(0))
    with pytest.raises(ValueError, match="last batch 2"):
        dp.check_split(14, 4)
    dp.check_split(15, 4)
    rng = np.random.default_rng(0)
    idx, local = DataParallel(FakeComm(size=1), EpsObjective(m, {}), "eps").shard(np.arange(4), rng)
    assert local is rng and list(idx) == [0, 1, 2, 3]      # one rank: nothing changes


def test_abort_on_error_aborts_only_a_real_failure_of_several_ranks(capsys):
    from refdiff.distributed import abort_on_error

    comm = FakeComm(rank=1, size=2)
    with abort_on_error(comm):
        raise KeyError("x")
    assert comm.aborted == 1 and "rank 1 of 2 stopped (KeyError: 'x')" in capsys.readouterr().err
    comm = FakeComm(rank=1, size=2)
    with abort_on_error(comm):
        raise SystemExit(2)
    assert comm.aborted == 2
    comm = FakeComm(rank=0, size=2)
    with pytest.raises(SystemExit), abort_on_error(comm):
        raise SystemExit(0)
    assert comm.aborted is None
    with pytest.raises(KeyError), abort_on_error(FakeComm(size=1)):
        raise KeyError("x")


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1], sys.argv[2]))
