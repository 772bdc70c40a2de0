"""Which test references each public function, class and method of the reference, and
whether a test that references it also compares a value.

    python -m tests.mutation.public_api              # table of every public name and its tests
    python -m tests.mutation.public_api --missing    # only the names no test mentions
    python -m tests.mutation.public_api --unchecked  # names no comparing test mentions, too

Public: module-level functions and classes of refdiff/*.py, refdiff/nn/*.py and
refdiff/data/*.py (not refdiff/commands/, the command-line layer, tested through the CLI),
and the methods of those classes, whose names do not start with "_". A test "references" a
name when the name appears as a word in a test file (tests/test_*.py), or, for an op pair
member, its op name as a string (tests pass it to getattr), or, for a registered model
factory, its registry name.

A reference is "compared" when it lies in a test function that compares a value (an
`assert` with ==, !=, <, <=, > or >=, or a call named like assert_*/allclose/array_equal/
isclose/approx/check_op), or in a helper or fixture of the same file that such a test uses
(by call or by fixture parameter, transitively), or at module level of a file that has such
a test (tables of cases). A name referenced only by tests that compare nothing (only
`pytest.raises`, only `is not None`, only `in str(err)`) is "named only": the bug-finding
part of a value check is missing (e.g. a function called only by bad-input tests).
Both are necessary conditions for a value check, not a proof of one: docs/testing.md lists,
for the numerical core, which test checks each by value.
"""
from __future__ import annotations

import ast
import re
import sys
from functools import lru_cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ["refdiff", "refdiff/nn", "refdiff/data"]


def public_names():
    """[(module, qualified name)] for every public function, class and method."""
    out = []
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).glob("*.py")):
            if path.name.startswith("_") and path.name != "__init__.py" or path.name == "__init__.py":
                continue
            module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            for node in ast.parse(path.read_text()).body:
                if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and not node.name.startswith("_"):
                    out.append((module, node.name))
                if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
                    for item in node.body:
                        if isinstance(item, ast.FunctionDef) and not item.name.startswith("_"):
                            out.append((module, f"{node.name}.{item.name}"))
    return out


def references():
    """{(module, name): [test files mentioning the name]}."""
    return {k: sorted(v) for k, (v, _) in _scan().items()}


def compared():
    """{(module, name): [test files where a comparing test (or its helper) mentions the name]}."""
    return {k: sorted(c) for k, (_, c) in _scan().items()}


_VALUE_OPS = (ast.Eq, ast.NotEq, ast.Lt, ast.LtE, ast.Gt, ast.GtE, ast.Is)
_VALUE_CALL = re.compile(r"assert|allclose|array_equal|isclose|approx|check_op")
HELPER_FILES = ("tests/helpers.py", "refdiff_cuda/testing.py")     # their comparing functions count too


def _is_value_compare(c):
    """A comparison of values: not `x is not None`, not `"word" in message`."""
    if any(isinstance(o, _VALUE_OPS) for o in c.ops):
        return True
    return any(isinstance(o, ast.IsNot) for o in c.ops) and not any(
        isinstance(x, ast.Constant) and x.value is None for x in [c.left, *c.comparators])


def _compares(node, helpers=frozenset()):
    """Does this function compare a value (see the module docstring)?"""
    for sub in ast.walk(node):
        if isinstance(sub, ast.Assert) and any(isinstance(c, ast.Compare) and _is_value_compare(c)
                                               for c in ast.walk(sub.test)):
            return True
        if isinstance(sub, ast.Call):
            f = sub.func
            name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
            if (_VALUE_CALL.search(name) and name != "assert_raises") or name in helpers:
                return True
    return False


@lru_cache(maxsize=1)
def _helpers():
    """Names of the shared helpers that compare values (check_grads, check_adam, ...)."""
    funcs = {}
    for rel in HELPER_FILES:
        for n in ast.walk(ast.parse((ROOT / rel).read_text())):
            if isinstance(n, ast.FunctionDef):
                funcs[n.name] = n
    out = set()
    while True:
        new = {k for k, n in funcs.items() if k not in out and _compares(n, frozenset(out))}
        if not new:
            return frozenset(out)
        out |= new


def _file_parts(text):
    """-> (module-level text, {function name: (source, compares, names it uses)}) of one test file.
    Functions nested in classes count under their own name."""
    tree = ast.parse(text)
    defs = [n for node in tree.body for n in (node.body if isinstance(node, ast.ClassDef) else [node])
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    local = set()                      # this file's own comparing helpers (check_jvp, ...)
    while True:
        new = {n.name for n in defs if n.name not in local and _compares(n, _helpers() | local)}
        if not new:
            break
        local |= new
    funcs, top = {}, []
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            nodes = [n for n in node.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            nodes = [node]
        else:
            top.append(ast.get_source_segment(text, node) or "")
            continue
        for n in nodes:
            src = "\n".join(ast.get_source_segment(text, d) or "" for d in n.decorator_list + [n])
            uses = {x.id for x in ast.walk(n) if isinstance(x, ast.Name)} | {a.arg for a in n.args.args}
            funcs[n.name] = (src, _compares(n, _helpers() | local), uses)
    # a helper or fixture is "comparing" when a comparing test reaches it
    reach = {k for k, (_, c, _) in funcs.items() if c and k.startswith("test")}
    todo = list(reach)
    while todo:
        for u in funcs[todo.pop()][2]:
            if u in funcs and u not in reach:
                reach.add(u)
                todo.append(u)
    return "\n".join(top), {k: (src, k in reach) for k, (src, _, _) in funcs.items()}, bool(reach)


@lru_cache(maxsize=1)
def _scan():
    parts = {p.name: _file_parts(p.read_text()) for p in sorted((ROOT / "tests").glob("test_*.py"))}
    table = {}
    for module, name in public_names():
        pats = _patterns(name)
        hit = lambda src: any(p.search(src) for p in pats)
        named, comp = set(), set()
        for t, (top, funcs, any_cmp) in parts.items():
            if hit(top):
                named.add(t)
                if any_cmp:
                    comp.add(t)
            for src, reached in funcs.values():
                if hit(src):
                    named.add(t)
                    if reached:
                        comp.add(t)
        table[(module, name)] = (named, comp)
    return table


def _patterns(name):
    """The name as a word; for an op pair member (conv2d_jvp_forward) also its op name as a
    string ("conv2d"), which tests pass to getattr; for a registered factory (unet_seed) also
    its registry name ("unet-seed")."""
    short = name.split(".")[-1]
    pats = [re.compile(r"\b" + re.escape(short) + r"\b")]
    stem = re.sub(r"(_jvp)?_(forward|backward)$", "", short)
    if stem != short:
        pats.append(re.compile(r"[\"']" + re.escape(stem) + r"[\"']"))
    if "_" in short:
        pats.append(re.compile(r"[\"']" + re.escape(short.replace("_", "-")) + r"[\"']"))
    return pats


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    table, comp = references(), compared()
    missing = [k for k, v in table.items() if not v]
    unchecked = [k for k, v in table.items() if v and not comp[k]]
    for (module, name), files in table.items():
        if files and comp[(module, name)] and not ({"--missing", "--unchecked"} & set(argv)):
            print(f"{module}:{name}  {', '.join(files)}")
    if "--missing" not in argv:
        for module, name in unchecked:
            print(f"{module}:{name}  (named only, in {', '.join(table[(module, name)])})")
    for module, name in missing:
        print(f"{module}:{name}  (no test mentions it)")
    print(f"{len(table) - len(missing)} of {len(table)} public names are mentioned by a test; "
          f"{len(table) - len(missing) - len(unchecked)} by a test that compares a value", file=sys.stderr)


if __name__ == "__main__":
    main()
