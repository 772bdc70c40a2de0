"""Hypothesis settings profiles, chosen once for the whole suite (tests/helpers.py:
hypothesis_profile):

- "ci" (selected when the CI variable is set, as .ci/run does): derandomized, so every run
  draws the same examples and a red CI is reproducible; no example database; print_blob so
  a failure prints the line that replays it.
- "dev" (default elsewhere): a fresh random search each run, failures saved in .hypothesis/.
- "thorough": the random search with 20x each test's example budget:
      HYPOTHESIS_PROFILE=thorough python -m pytest -q tests/test_conv_ops.py
No per-test deadline anywhere: run time on a shared 2-core machine says nothing about a bug.
"""
from hypothesis import settings

from tests.helpers import hypothesis_profile

settings.register_profile("ci", derandomize=True, database=None, print_blob=True, deadline=None)
settings.register_profile("dev", print_blob=True, deadline=None)
settings.register_profile("thorough", print_blob=True, deadline=None)
settings.load_profile(hypothesis_profile())
