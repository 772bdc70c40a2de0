"""pytest plugin for the mutation runs (`-p tests.mutation.no_shrink` in setup.cfg [mutmut] and
tests/mutation/kernels.cfg): hypothesis's "mutation" profile, CI's profile without the shrink
and explain phases.

A mutant is caught by the first failing example; shrinking that example to a minimal one
(hundreds of re-runs of the test, each through the mutant) says nothing more to mutmut and
was most of the time a caught mutant took. Loaded in pytest_configure, after tests/conftest.py
has loaded its own profile and before the test modules are imported, so that their
settings(...) objects, which inherit the unset fields from the profile loaded at that time,
inherit this one too.
"""
from hypothesis import Phase, settings


def pytest_configure(config):
    phases = [p for p in Phase if p.name not in ("shrink", "explain")]
    settings.register_profile("mutation", parent=settings.get_profile("ci"), phases=phases)
    settings.load_profile("mutation")
