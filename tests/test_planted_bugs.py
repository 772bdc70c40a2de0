"""A fixed set of realistic bugs, planted one at a time in a copy of the package, each of which
the suite must catch: the CI-sized subset of mutation testing (the whole job, with mutmut, is
tests/mutation/run.sh; docs/testing.md).

Each bug is a one-line (or two-line) edit of the kind people make in this code: a lost factor,
a swapped pair, sigma^2 written sigma, a loop index off by one in a numba kernel, a dropped
tangent term, an unchecked checksum. For each, in a scratch copy of refdiff/, refdiff_cuda/,
tests/ and setup.cfg (imported first through PYTHONPATH), the named tests pass on the clean
copy (all of them in one process, the control) and, in a process of their own, fail with the
bug (pytest's exit code 1: tests ran and failed, not an import or collection error). The text a bug replaces must occur exactly
once in its file, so a change of the code makes this table fail loudly instead of going stale.
A kernel's bug (and the control) runs with NUMBA_DISABLE_JIT=1: version 1 as the Python it is,
as in the kernels' mutation run (and no compilation of the copy's kernels)."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# name: (file, text, replacement, the tests that must catch it)
BUGS = {
    "probability-flow drift without its 1/2": (
        "refdiff/sde.py", "return self.drift(x, t) - 0.5 * g * g * score", "return self.drift(x, t) - g * g * score",
        ["tests/test_samplers.py::test_probability_flow_drift_is_the_gaussian_rescaling"]),
    "cosine schedule clipped at 0.99": (
        "refdiff/sde.py", "np.clip(1 - f[1:] / f[:-1], 0, 0.999)", "np.clip(1 - f[1:] / f[:-1], 0, 0.99)",
        ["tests/test_sde.py::test_ddpm_schedule_cosine_values"]),
    "Langevin corrector noise sqrt(e) for sqrt(2e)": (
        "refdiff/samplers.py", "x = x + e * s + np.sqrt(2 * e) * z", "x = x + e * s + np.sqrt(e) * z",
        ["tests/test_langevin_corrector.py::test_one_corrector_step_is_score_sde"]),
    "energy distance without the 2 on E|X-Y|": (
        "refdiff/metrics.py", "float(2 * _mean_pairwise(a, b)", "float(_mean_pairwise(a, b)",
        ["tests/test_metrics.py::test_energy_distance_hand_computed"]),
    "EMA update inverted": (
        "refdiff/optim.py", "e *= d\n            e += (1 - d) * p", "e *= 1 - d\n            e += d * p",
        ["tests/test_optim.py::test_ema_two_steps_by_hand"]),
    "gradient clipping by the squared norm": (
        "refdiff/optim.py", "total = math.sqrt(sum(", "total = (sum(",
        ["tests/test_optim.py::test_clip_grad_norm_leaves_small_gradients_alone",
         "tests/test_optim.py::test_clip_grad_norm_scales_to_max_norm"]),
    "beta_tilde's ratio upside down": (
        "refdiff/ddpm.py", "(1 - ab_prev) / (1 - ab) * b", "(1 - ab) / (1 - ab_prev) * b",
        ["tests/test_ddpm.py::test_ancestral_one_step_by_hand"]),
    "DDIM's sigma^2 written sigma": (
        "refdiff/ddpm.py", "math.sqrt(max(1 - ab_prev - sigma ** 2, 0.0))", "math.sqrt(max(1 - ab_prev - sigma, 0.0))",
        ["tests/test_ddpm.py::test_ddim_eta1_oracle_marginals"]),
    "linear JVP's weight gradient without the tangent's term": (
        "refdiff/nn/tangent.py", "return dx, dxdot, dw + dw_dot, db", "return dx, dxdot, dw, db",
        ["tests/test_tangent.py::test_linear_jvp"]),
    "checkpoint checksum not checked": (
        "refdiff/checkpoint.py", "        if _digest(v) != sums[k]:", "        if False and _digest(v) != sums[k]:",
        ["tests/test_checkpoint.py::test_array_replaced_without_manifest_is_refused"]),
    "Hutchinson's trace summed over probes instead of averaged": (
        "refdiff/likelihood.py", "return s[:B], est.mean(axis=0)", "return s[:B], est.sum(axis=0)",
        ["tests/test_likelihood.py::test_hutchinson_is_unbiased"]),
    "bits/dim offset log2(255/2)": (
        "refdiff/likelihood.py", "math.log2(256.0 / (hi - lo))", "math.log2(255.0 / (hi - lo))",
        ["tests/test_likelihood.py::test_bits_per_dim_of_the_uniform_density_is_8"]),
    "numba im2col (version 1) reading one pixel to the right": (
        "refdiff_cuda/numba_cpu/conv.py", "cols[row, b * n + m] = xf[c, b, i * Wp + j + stride * m]",
        "cols[row, b * n + m] = xf[c, b, i * Wp + j + stride * m + 1]",
        ["tests/test_backend_ops.py::test_pair_agrees[numba-conv2d-v1]"]),
}


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    d = tmp_path_factory.mktemp("planted")
    for sub in ("refdiff", "refdiff_cuda", "tests"):
        shutil.copytree(REPO / sub, d / sub, ignore=shutil.ignore_patterns("__pycache__", ".hypothesis"))
    shutil.copy(REPO / "setup.cfg", d / "setup.cfg")
    # the control: every named test passes on the clean copy (one process for all of them)
    tests = sorted({t for _, _, _, ts in BUGS.values() for t in ts})
    clean = _pytest(d, tests, kernel=True)
    assert clean.returncode == 0, f"the clean copy fails the named tests:\n{clean.stdout[-3000:]}{clean.stderr[-2000:]}"
    return d


def _pytest(d, tests, kernel):
    env = dict(os.environ, CI="true", PYTHONPATH=str(d), NUMBA_DISABLE_JIT="1" if kernel else "0")
    env.pop("HYPOTHESIS_PROFILE", None)
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x", *tests],
                          cwd=d, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(BUGS))
def test_the_suite_catches_the_planted_bug(scratch, name):
    path, old, new, tests = BUGS[name]
    kernel = path.startswith("refdiff_cuda/")
    if kernel:
        pytest.importorskip("numba", reason="the kernel's tests need numba")
    source = (scratch / path).read_text()
    assert source.count(old) == 1, f"{path} no longer holds {old!r} exactly once: update this bug's entry"
    (scratch / path).write_text(source.replace(old, new))
    try:
        bugged = _pytest(scratch, tests, kernel)
    finally:
        (scratch / path).write_text(source)
    assert bugged.returncode == 1, (f"bug {name!r} in {path} was not caught by {tests} (pytest exit "
                                    f"{bugged.returncode}):\n{bugged.stdout[-3000:]}{bugged.stderr[-2000:]}")
