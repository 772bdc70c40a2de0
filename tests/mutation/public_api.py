"""Which test references each public function, class and method of the reference.

    python -m tests.mutation.public_api            # table of every public name and its tests
    python -m tests.mutation.public_api --missing  # only the names no test mentions

Public: module-level functions and classes of refdiff/*.py, refdiff/nn/*.py and
refdiff/data/*.py (not refdiff/commands/, the command-line layer, tested through the CLI),
and the methods of those classes, whose names do not start with "_". A test "references" a
name when the name appears as a word in a test file (tests/test_*.py), or, for an op pair
member, its op name as a string (tests pass it to getattr), or, for a registered model
factory, its registry name. That is a
necessary condition for a value check, not a proof of one: docs/testing.md lists, for the
numerical core, which test checks each by value.
"""
from __future__ import annotations

import ast
import re
import sys
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
    tests = {p.name: p.read_text() for p in sorted((ROOT / "tests").glob("test_*.py"))}
    table = {}
    for module, name in public_names():
        table[(module, name)] = [t for t, text in tests.items() if any(p.search(text) for p in _patterns(name))]
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
    table = references()
    missing = [k for k, v in table.items() if not v]
    for (module, name), files in table.items():
        if files and "--missing" not in argv:
            print(f"{module}:{name}  {', '.join(files)}")
    for module, name in missing:
        print(f"{module}:{name}  (no test mentions it)")
    print(f"{len(table) - len(missing)} of {len(table)} public names are mentioned by a test", file=sys.stderr)


if __name__ == "__main__":
    main()
