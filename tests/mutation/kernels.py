"""The numba kernels' mutation run: version 1 of each op, made visible to mutmut in a scratch copy.

    python -m tests.mutation.kernels WORKDIR      # called by tests/mutation/run.sh

Version 1 of an op is what refdiff_cuda.numba_cpu's KERNELS[op][1] names, plus every function
of the same module it calls (helpers shared with version 2, such as functional._step or
conv._prep, included): the literal port of the reference that every faster version is held
to. mutmut leaves decorated functions alone (a trampoline cannot sit under a decorator that
compiles or registers the function), and a trampoline, which picks the mutant through Python
globals at run time, cannot be compiled by @njit anyway. So this script, in WORKDIR (a copy of
the committed tree, never the repository):

  1. removes the @njit decorators of the version-1 functions of KERNEL_MODULES; the run sets
     NUMBA_DISABLE_JIT=1, under which @njit returns the Python function unchanged (and prange
     is range), so the tests run the same code in Python;
  2. gives every other undecorated function of those modules the decorator `@(lambda f: f)`
     (the identity), so mutmut leaves it alone too: it is not version 1;
  3. replaces the [mutmut] section of WORKDIR/setup.cfg with tests/mutation/kernels.cfg, which
     mutates these modules only and selects the agreement tests of version 1
     (tests/test_backend_ops.py, refdiff_cuda.testing.check_op on small hypothesis inputs).

It prints the version-1 functions per module. The mutants are named as mutmut names them
(refdiff_cuda.numba_cpu.conv.x__im2col_v1__mutmut_3), so tests/mutation/report.py and
docs/mutation-survivors.json treat them like the reference's.
"""
from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

KERNEL_MODULES = ("functional", "conv", "norm", "attention", "fused")   # where the version-1 ports live
HERE = Path(__file__).resolve().parent
SKIP = "@(lambda f: f)  # not version 1 of an op: mutmut leaves decorated functions alone\n"


def _names(node):
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}


def version1_functions(tree):
    """Names of the module-level functions that make up version 1 (see the module docstring)."""
    defs = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
    assigned = {}                                   # ddpm_step_v1 = _ddpm(_axpby_v1): its names
    kernels = None
    for n in tree.body:
        if isinstance(n, ast.Assign) and len(n.targets) == 1:
            t = n.targets[0]
            if isinstance(t, ast.Name) and t.id == "KERNELS":
                kernels = n.value
            if isinstance(t, ast.Name):
                assigned[t.id] = _names(n.value)
            elif isinstance(t, ast.Tuple) and isinstance(n.value, ast.Tuple):     # a, b = f(x), f(y)
                for e, v in zip(t.elts, n.value.elts):
                    if isinstance(e, ast.Name):
                        assigned[e.id] = _names(v)
    if not isinstance(kernels, ast.Dict):
        raise ValueError("no KERNELS = {...} literal")
    todo = []
    for versions in kernels.values:
        for k, v in zip(versions.keys, versions.values):
            if isinstance(k, ast.Constant) and k.value == 1:
                todo += sorted(_names(v))
    seen = set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        if name in defs:
            todo += sorted(_names(defs[name]) - seen)
        elif name in assigned:
            todo += sorted(assigned[name] - seen)
    return sorted(seen & set(defs))


def rewrite(source):
    """(source with version 1 undecorated and the rest decorated by the identity, v1 names)."""
    tree = ast.parse(source)
    v1 = set(version1_functions(tree))
    lines = source.splitlines(keepends=True)
    for n in sorted((n for n in tree.body if isinstance(n, ast.FunctionDef)), key=lambda n: -n.lineno):
        if n.name in v1 and n.decorator_list:
            first = min(d.lineno for d in n.decorator_list) - 1     # the '@' line, 0-based
            del lines[first:n.lineno - 1]
        elif n.name not in v1 and not n.decorator_list:
            lines.insert(n.lineno - 1, SKIP)
    return "".join(lines), sorted(v1)


def replace_section(cfg_text, section, new_body):
    """cfg_text with [section]'s body (up to the next [header]) replaced by new_body."""
    pat = re.compile(rf"^\[{re.escape(section)}\]\n.*?(?=^\[|\Z)", re.S | re.M)
    if not pat.search(cfg_text):
        raise ValueError(f"no [{section}] section")
    return pat.sub(lambda m: new_body.rstrip("\n") + "\n\n", cfg_text, count=1)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        raise SystemExit("usage: python -m tests.mutation.kernels WORKDIR")
    work = Path(argv[0])
    if (work / ".git").exists():
        raise SystemExit(f"{work}: refusing to rewrite a repository; give the scratch copy")
    for mod in KERNEL_MODULES:
        path = work / "refdiff_cuda" / "numba_cpu" / f"{mod}.py"
        text, v1 = rewrite(path.read_text())
        path.write_text(text)
        print(f"{mod}: {len(v1)} version-1 functions: {' '.join(v1)}")
    cfg = work / "setup.cfg"
    cfg.write_text(replace_section(cfg.read_text(), "mutmut", (HERE / "kernels.cfg").read_text()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
