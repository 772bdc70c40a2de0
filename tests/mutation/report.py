"""Mutation score of a mutmut run, with the survivors explained in docs/mutation-survivors.json.

    python -m tests.mutation.report [--workdir DIR ...] [--json OUT] [--list STATUS] [--forget STATUS]

Reads mutmut's results (DIR/mutants/**/*.py.meta, for each --workdir; default: the two runs of
tests/mutation/run.sh, $MUTATION_WORKDIR/core and $MUTATION_WORKDIR/kernels, MUTATION_WORKDIR
defaulting to /tmp/refdiff-mutation), counts per module killed / survived / timeout / no tests
/ not yet run, and prints the score

    killed (timeouts count as killed: the mutant hangs) / (checked - equivalent),

where "equivalent" are the survivors docs/mutation-survivors.json marks as such (the mutant
computes the same thing). Survivors that the file does not explain are listed: each needs a
test, or an entry with its one-line reason. --json writes the counts (for docs/testing.md);
--list STATUS prints only the names of the mutants with that status (run.sh re-runs the
timeouts with it); --forget STATUS erases the results of the mutants with that status, so the
next tests/mutation/run.sh on that workdir runs them again against the current tests (mutmut
keeps a mutant's result until its function changes, and collects the coverage of new tests
only). "no tests" (no test of the selection calls the function) counts as
not caught, like a survivor.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
STATUS = {1: "killed", 3: "killed", 0: "survived", 5: "no tests", 33: "no tests", 34: "skipped",
          36: "timeout", 24: "timeout", -24: "timeout", 152: "timeout", 255: "timeout", None: "not run",
          -11: "crashed", -9: "crashed"}


def results(workdir):
    """{mutant name: status} over every .meta file mutmut wrote."""
    out = {}
    for meta in sorted(Path(workdir, "mutants").rglob("*.py.meta")):
        for name, code in _read_meta(meta)["exit_code_by_key"].items():
            out[name] = STATUS.get(code, "suspicious")
    return out


def _read_meta(meta, tries=20):
    """A .meta file's JSON; mutmut rewrites them in place during a run, so a half-written one
    is read again a moment later."""
    for k in range(tries):
        try:
            return json.loads(meta.read_text())
        except json.JSONDecodeError:
            if k == tries - 1:
                raise
            time.sleep(0.1)


def forget(workdir, status):
    """Erase, in each .meta file, the result of every mutant whose status is `status`."""
    n = 0
    for meta in sorted(Path(workdir, "mutants").rglob("*.py.meta")):
        data = _read_meta(meta)
        codes = data["exit_code_by_key"]
        names = [k for k, code in codes.items() if STATUS.get(code, "suspicious") == status]
        for k in names:
            codes[k] = None
        if names:
            tmp = meta.with_suffix(".tmp")
            tmp.write_text(json.dumps(data))
            tmp.replace(meta)
            n += len(names)
    return n


def survivors_file():
    path = ROOT / "docs" / "mutation-survivors.json"
    return {e["mutant"]: e for e in json.loads(path.read_text())["survivors"]} if path.exists() else {}


def module_of(mutant):
    return mutant.rsplit(".", 1)[0]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    base = os.environ.get("MUTATION_WORKDIR", "/tmp/refdiff-mutation")
    ap.add_argument("--workdir", action="append", help="a mutmut run's directory (repeatable)")
    ap.add_argument("--json", help="write the counts here")
    ap.add_argument("--list", metavar="STATUS", help="only print the names of the mutants with this status")
    ap.add_argument("--forget", metavar="STATUS",
                    help="erase the results of the mutants with this status (the next run redoes them)")
    args = ap.parse_args(argv)
    workdirs = args.workdir or [os.path.join(base, "core"), os.path.join(base, "kernels")]
    if args.forget:
        for w in workdirs:
            print(w, forget(w, args.forget), "results erased")
        return 0
    res = {}
    for w in workdirs:
        if os.path.isdir(os.path.join(w, "mutants")):
            res.update(results(w))
    if args.list:
        for name, status in sorted(res.items()):
            if status == args.list:
                print(name)
        return 0
    known = survivors_file()
    by_module = defaultdict(Counter)
    for name, status in res.items():
        by_module[module_of(name)][status] += 1
    print(f"{'module':34s} {'killed':>7s} {'timeout':>7s} {'survived':>8s} {'equiv':>5s} {'no tests':>8s} {'not run':>7s}")
    total = Counter()
    for module, c in sorted(by_module.items()):
        equiv = sum(1 for n, s in res.items() if s == "survived" and module_of(n) == module
                    and known.get(n, {}).get("equivalent"))
        c["equivalent"] = equiv
        total.update(c)
        print(f"{module:34s} {c['killed']:7d} {c['timeout']:7d} {c['survived']:8d} {equiv:5d} {c['no tests']:8d} "
              f"{c['not run']:7d}")
    caught = total["killed"] + total["timeout"]
    checked = caught + total["survived"] + total["no tests"]
    score = caught / max(1, checked - total["equivalent"])
    print(f"score: {caught} caught / ({checked} checked - {total['equivalent']} equivalent) = {100 * score:.1f} %"
          f"  ({total['not run']} not run yet)")
    unexplained = sorted(n for n, s in res.items() if s in ("survived", "no tests") and n not in known)
    if unexplained:
        print(f"{len(unexplained)} survivors not in docs/mutation-survivors.json (`mutmut show NAME` in the workdir):")
        for n in unexplained:
            print("   ", n, f"({res[n]})")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(total=dict(total), score=score,
                                                   modules={m: dict(c) for m, c in by_module.items()}), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
