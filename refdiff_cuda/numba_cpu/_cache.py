"""Where the numba backend's compiled kernels are cached: a user cache directory, never the
installed package (which may be read-only, and is shared by every user of it).

    cache_dir()        NUMBA_CACHE_DIR if set (numba's own setting), else
                       $XDG_CACHE_HOME/refdiff/numba, else ~/.cache/refdiff/numba
    caching_into()     a context in which @njit(cache=True) functions get that directory
    cached_njit(...)   njit(cache=True, ...) into that directory, for functions decorated
                       after import (the loops built per dtype in conv_v5.py and silu_v3.py)

numba fixes a function's cache directory when the function is decorated, from
numba.config.CACHE_DIR; caching_into sets it only around our decorations (the package's
imports in __init__.py, and cached_njit), so the
rest of the process (other libraries' cached functions) keeps numba's own default.
"""
from __future__ import annotations

import contextlib
import os

import numba


def cache_dir(environ=os.environ):
    """The directory (see the module docstring) for this environment."""
    if environ.get("NUMBA_CACHE_DIR"):
        return environ["NUMBA_CACHE_DIR"]
    base = environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "refdiff", "numba")


@contextlib.contextmanager
def caching_into(path=None):
    """numba.config.CACHE_DIR = path (default cache_dir()) inside the block only."""
    old = numba.config.CACHE_DIR
    numba.config.CACHE_DIR = cache_dir() if path is None else path
    try:
        yield
    finally:
        numba.config.CACHE_DIR = old


def cached_njit(**options):
    """numba.njit(cache=True, **options), cached in cache_dir()."""
    def decorate(f):
        with caching_into():
            return numba.njit(cache=True, **options)(f)
    return decorate
