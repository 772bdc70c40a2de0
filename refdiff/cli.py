"""The `refdiff` command: one subcommand per module in refdiff/commands/.

Each command module defines `add_arguments(parser)` and `run(args) -> int`, and may define
`INTERRUPTED`, the sentence printed when the user interrupts it (or raise KeyboardInterrupt
with a more precise one); COMMANDS maps subcommand
names to modules (imported when the parser is built). A command maps its flags onto the
library's config and calls the library; it does no work of its own.

Every failure ends in one line on stderr, `refdiff COMMAND: error: WHAT` (what is wrong and
what to do), and an exit code:

    2    bad input: a bad flag (argparse), ValueError (a bad value, a bad checkpoint, an
         unusable --out, a directory another run holds), a missing or unreadable input file
    1    a runtime failure: divergence (FloatingPointError), out of memory, the disk full or
         another I/O error; any other exception is an internal error (a bug), also 1
    130  interrupted (Ctrl-C)

The traceback is printed too with `--debug` (before or after the command) or REFDIFF_DEBUG=1.
"""
from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys
import traceback
import warnings

COMMANDS = {
    "ring": ("refdiff.commands.ring", "train a score model on 2-D toy data, sample, score (report §2.5.1)"),
    "train": ("refdiff.commands.train", "train a model on images (DDPM UNet, VAE, GAN, classifier)"),
    "sample": ("refdiff.commands.sample", "draw images from a trained checkpoint"),
    "evaluate": ("refdiff.commands.evaluate", "score a file of images with the MNIST classifier"),
    "compare": ("refdiff.commands.compare", "table 3.2 of the report: real vs VAE vs GAN vs DDPM"),
    "likelihood": ("refdiff.commands.likelihood", "bits/dim of real images under a diffusion checkpoint"),
}

BAD_INPUT, FAILURE, INTERRUPT = 2, 1, 130
_DISK_FULL = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))
_NOT_WRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM)


def build_parser():
    parser = argparse.ArgumentParser(prog="refdiff", description="Score-based diffusion models, by hand.")
    parser.add_argument("--debug", action="store_true", help="print the traceback of an error (or REFDIFF_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(_module=module)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        importlib.import_module(module).add_arguments(p)
    return parser


def _os_error(exc):
    """(exit code, message) for an OSError."""
    where = f" {exc.filename!r}" if exc.filename else ""
    what = exc.strerror or str(exc)
    if exc.errno in _DISK_FULL:
        return FAILURE, (f"no space left on device writing{where}: free some space and run again "
                         f"(the files already there are intact)")
    if exc.errno in _NOT_WRITABLE:
        return BAD_INPUT, f"cannot write{where}: {what}; choose a writable --out"
    if isinstance(exc, (FileNotFoundError, IsADirectoryError, NotADirectoryError, FileExistsError)):
        return BAD_INPUT, f"{what}:{where}"
    return FAILURE, f"input/output error on{where}: {what}"


def describe(exc, interrupted=None):
    """(exit code, one-line message) for an exception that ended a command."""
    if isinstance(exc, KeyboardInterrupt):
        note = str(exc) or interrupted         # a command may say what is on disk at that moment
        return INTERRUPT, "interrupted" + (f"; {note}" if note else "")
    if isinstance(exc, FloatingPointError):
        return FAILURE, str(exc)
    if isinstance(exc, MemoryError):
        return FAILURE, f"out of memory ({str(exc) or 'an allocation failed'}): use a smaller --n or --batch"
    if isinstance(exc, FileNotFoundError) and not exc.filename:
        return BAD_INPUT, str(exc)                 # refdiff's own "X does not exist: do Y"
    if isinstance(exc, OSError):
        return _os_error(exc)
    if isinstance(exc, ValueError):
        return BAD_INPUT, str(exc)
    return FAILURE, (f"internal error ({type(exc).__name__}: {exc}); this is a bug: run again with --debug "
                     f"for the traceback and report it")


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = args.debug or os.environ.get("REFDIFF_DEBUG", "") not in ("", "0")
    module = importlib.import_module(args._module)
    try:
        from .distributed import quiet_unless_root
        with warnings.catch_warnings(), quiet_unless_root():    # under mpirun rank 0 reports for all
            if not debug:   # a diverging run overflows on its way; DivergenceGuard says so in one line
                warnings.filterwarnings("ignore", "(overflow|invalid value|divide by zero) encountered", RuntimeWarning)
            return int(module.run(args) or 0)
    except (Exception, KeyboardInterrupt) as exc:    # noqa: BLE001 - every failure becomes one line
        code, message = describe(exc, getattr(module, "INTERRUPTED", None))
        if debug:
            traceback.print_exc()
        if code == INTERRUPT:          # on its own line, after a progress line
            print(f"\nrefdiff {args.command}: {message}", file=sys.stderr)
        else:
            print(f"refdiff {args.command}: error: {message}", file=sys.stderr)
        from .distributed import abort_others
        abort_others(code)               # under mpirun: stop the other ranks rather than leave them waiting
        return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
