"""tests/mutation/kernels.py: which numba functions count as version 1 of an op (and so are
mutated), and the rewrite that lets mutmut see them."""
import ast
import textwrap
from pathlib import Path

from tests.mutation.kernels import KERNEL_MODULES, replace_section, rewrite, version1_functions

NUMBA_CPU = Path(__file__).resolve().parents[1] / "refdiff_cuda" / "numba_cpu"

TOY = textwrap.dedent('''
    from numba import njit

    def _shared(x):
        return x

    @njit(cache=True)
    def _k_v1(x):
        return _shared(x) + 1

    @njit(parallel=True)
    def _k_v2(x):
        return x + 1

    def op_v1(x):
        return _k_v1(x)

    def op_v2(x):
        return _k_v2(_shared(x))

    def _make(k):
        def step(x):
            return k(x)
        return step

    step_v1, step_v2 = _make(_k_v1), _make(_k_v2)
    KERNELS = {"op": {1: (op_v1,), 2: (op_v2,)}, "step": {1: (step_v1,), 2: (step_v2,)}}
''')


def test_version1_is_the_closure_of_the_kernels_first_entries():
    assert version1_functions(ast.parse(TOY)) == ["_k_v1", "_make", "_shared", "op_v1"]


def test_rewrite_undecorates_version1_and_decorates_the_rest():
    out, v1 = rewrite(TOY)
    tree = ast.parse(out)
    decorated = {n.name: bool(n.decorator_list) for n in tree.body if isinstance(n, ast.FunctionDef)}
    assert decorated == {"_shared": False, "_k_v1": False, "_k_v2": True, "op_v1": False, "op_v2": True,
                         "_make": False}
    ns = {}
    exec(compile(out.replace("from numba import njit", "njit = lambda **kw: (lambda f: f)"), "toy", "exec"), ns)
    assert ns["op_v1"](1) == 2 and ns["step_v2"](1) == 2          # the module still works


def test_every_numba_op_has_version1_functions_without_decorators():
    for mod in KERNEL_MODULES:
        out, v1 = rewrite((NUMBA_CPU / f"{mod}.py").read_text())
        tree = ast.parse(out)
        fns = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
        assert v1 and all(not fns[name].decorator_list for name in v1), mod
        assert all(n.decorator_list for name, n in fns.items() if name not in v1), mod
        assert not any(name.endswith("_v2") for name in v1), (mod, v1)


def test_replace_section_swaps_only_that_section():
    cfg = "[a]\nx = 1\n\n[mutmut]\nold = 1\n\n[b]\ny = 2\n"
    assert replace_section(cfg, "mutmut", "[mutmut]\nnew = 2\n") == "[a]\nx = 1\n\n[mutmut]\nnew = 2\n\n[b]\ny = 2\n"
