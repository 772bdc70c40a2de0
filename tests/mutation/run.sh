#!/usr/bin/env bash
# Mutation testing of the numerical core with mutmut (configuration: setup.cfg [mutmut];
# results and score: docs/testing.md; survivors explained: docs/mutation-survivors.json).
#
#   pip install -e ".[test,numba,dev]"
#   tests/mutation/run.sh                          # every mutant of the numerical core
#   tests/mutation/run.sh "refdiff.optim.*"        # a subset, by mutmut's mutant-name glob
#   python -m tests.mutation.report                # score and unexplained survivors
#
# It runs in a scratch copy of the committed tree (MUTATION_WORKDIR, default
# /tmp/refdiff-mutation), so uncommitted edits neither leak into it nor get mutated; mutmut
# keeps its results in $MUTATION_WORKDIR/mutants/ and reruns only what changed. Each mutant
# runs only the tests that call the mutated function, with CI's derandomized hypothesis
# profile, at nice 15, one mutant at a time unless MUTATION_JOBS says otherwise.
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
work=${MUTATION_WORKDIR:-/tmp/refdiff-mutation}
mkdir -p "$work"
git -C "$repo" archive HEAD | tar -x -C "$work"
cd "$work"
export CI=true NUMBA_NUM_THREADS=1
nice -n 15 python -m mutmut run --max-children "${MUTATION_JOBS:-1}" "$@"
python -m tests.mutation.report --workdir "$work"
