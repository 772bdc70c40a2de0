#!/usr/bin/env bash
# Mutation testing of the numerical core with mutmut (configuration: setup.cfg [mutmut] for the
# reference, tests/mutation/kernels.cfg for version 1 of the numba kernels; results and score:
# docs/testing.md; survivors explained: docs/mutation-survivors.json).
#
#   pip install -e ".[test,numba,dev]"
#   tests/mutation/run.sh                          # every mutant: the reference, then the kernels
#   tests/mutation/run.sh "refdiff.optim.*"        # a subset, by mutmut's mutant-name glob
#   tests/mutation/run.sh "refdiff_cuda.numba_cpu.conv.*"      # globs of kernels go to their run
#   python -m tests.mutation.report                # score and unexplained survivors
#   python -m tests.mutation.report --forget survived && tests/mutation/run.sh
#                                                  # the survivors again, against new tests
#
# Two mutmut runs, each in a scratch copy of the committed tree (uncommitted edits neither
# leak into it nor get mutated), under MUTATION_WORKDIR (default /tmp/refdiff-mutation):
#   core/     the reference (setup.cfg [mutmut]);
#   kernels/  version 1 of the numba kernels, made visible to mutmut by tests/mutation/kernels.py
#             and run with NUMBA_DISABLE_JIT=1 (a trampoline cannot be compiled by @njit).
# mutmut keeps its results in <run>/mutants/ and reruns only what changed. Each mutant runs only
# the tests that call the mutated function, fastest first, stopping at the first failure, with
# CI's derandomized hypothesis profile, at nice 15. The two runs go side by side (their set-up,
# mutmut's one-process stats and clean-test runs, then overlaps the other's mutants): the
# reference's with MUTATION_JOBS (default 2) mutants at a time, the kernels' with one. Their
# output goes to $MUTATION_WORKDIR/core.log and kernels.log.
# Mutants that timed out are run again, one at a time: a timeout on a loaded machine is not a
# kill, and only a second timeout counts as one.
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
work=${MUTATION_WORKDIR:-/tmp/refdiff-mutation}
jobs=${MUTATION_JOBS:-2}
core_globs=() kernel_globs=()
for g in "$@"; do
    case $g in refdiff_cuda.*) kernel_globs+=("$g") ;; *) core_globs+=("$g") ;; esac
done

copy_tree() {     # the committed tree into $1 (mutmut's results in $1/mutants are kept)
    mkdir -p "$1"
    git -C "$repo" archive HEAD | tar -x -C "$1"
}

timeouts() {      # names of the mutants of the run in $1 whose last result is a timeout
    python -m tests.mutation.report --workdir "$1" --list timeout
}

run_mutmut() {    # run_mutmut DIR [GLOB...]
    local dir=$1; shift
    (cd "$dir" && nice -n 15 python -m mutmut run --max-children "$jobs" "$@")
    local again
    again=$(cd "$repo" && timeouts "$dir")
    if [ -n "$again" ]; then
        echo "re-running $(echo "$again" | wc -l) timed-out mutants one at a time"
        # shellcheck disable=SC2086
        (cd "$dir" && nice -n 15 python -m mutmut run --max-children 1 $again)
    fi
}

export CI=true NUMBA_NUM_THREADS=1
mkdir -p "$work"
exec 9> "$work/.lock"                  # one run per workdir: a second would rewrite the first's tree
flock -n 9 || { echo "$work is in use by another run.sh; set MUTATION_WORKDIR for a second one" >&2; exit 2; }
pids=()
if [ $# -eq 0 ] || [ ${#core_globs[@]} -gt 0 ]; then
    copy_tree "$work/core"
    run_mutmut "$work/core" "${core_globs[@]}" > "$work/core.log" 2>&1 &
    pids+=($!)
fi
if [ $# -eq 0 ] || [ ${#kernel_globs[@]} -gt 0 ]; then
    copy_tree "$work/kernels"
    (cd "$work/kernels" && python -m tests.mutation.kernels .)
    (jobs=1; NUMBA_DISABLE_JIT=1 run_mutmut "$work/kernels" "${kernel_globs[@]}") > "$work/kernels.log" 2>&1 &
    pids+=($!)
fi
status=0
for p in "${pids[@]}"; do wait "$p" || status=$?; done
for log in "$work"/core.log "$work"/kernels.log; do
    if [ -f "$log" ]; then
        echo "== $log"
        tr '\r' '\n' < "$log" | grep -v '^[^ ]* Running\|^[^ ]* Generating\|^$' | tail -n 12 || true
    fi
done
[ "$status" -eq 0 ] || { echo "a mutmut run failed (exit $status): see the logs above" >&2; exit "$status"; }
cd "$repo"
python -m tests.mutation.report --workdir "$work/core" --workdir "$work/kernels"
