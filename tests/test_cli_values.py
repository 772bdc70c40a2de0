"""refdiff.cli by value: the exit code and the one line `describe` gives each kind of failure
(the table in refdiff/cli.py's docstring), and the parser `build_parser` builds (one
subcommand per entry of COMMANDS, --debug accepted before or after it).
"""
from __future__ import annotations

import errno

import pytest

from refdiff import cli


@pytest.mark.parametrize("exc, interrupted, code, message", [
    (KeyboardInterrupt("checkpoint.npz holds epoch 3"), "ignored", 130, "interrupted; checkpoint.npz holds epoch 3"),
    (KeyboardInterrupt(), "nothing was written", 130, "interrupted; nothing was written"),
    (KeyboardInterrupt(), None, 130, "interrupted"),
    (FloatingPointError("training diverged at step 5"), None, 1, "training diverged at step 5"),
    (MemoryError(), None, 1, "out of memory (an allocation failed): use a smaller --n or --batch"),
    (FileNotFoundError("checkpoint 'c.npz' does not exist"), None, 2, "checkpoint 'c.npz' does not exist"),
    (FileNotFoundError(errno.ENOENT, "No such file or directory", "x.npy"), None, 2,
     "No such file or directory: 'x.npy'"),
    (OSError(errno.ENOSPC, "No space left on device", "/o/c.npz"), None, 1,
     "no space left on device writing '/o/c.npz': free some space and run again (the files already there are intact)"),
    (PermissionError(errno.EACCES, "Permission denied", "/o"), None, 2,
     "cannot write '/o': Permission denied; choose a writable --out"),
    (OSError(errno.EIO, "Input/output error", "/o/c.npz"), None, 1, "input/output error on '/o/c.npz': Input/output error"),
    (ValueError("--lr must be > 0"), None, 2, "--lr must be > 0"),
    (KeyError("w"), None, 1, "internal error (KeyError: 'w'); this is a bug: run again with --debug for the "
                             "traceback and report it"),
])
def test_describe_maps_each_failure_to_its_code_and_line(exc, interrupted, code, message):
    # bug caught: a disk-full reported as bad input (exit 2, "fix your flags"), a bug
    # reported as bad input, the interrupt note lost
    assert cli.describe(exc, interrupted) == (code, message)


# every command's required flags, given so that parsing reaches the subcommand's defaults
REQUIRED = ["--out", "o", "--samples", "s.npy", "--checkpoint", "c.npz"]


def test_build_parser_has_one_subcommand_per_command():
    # bug caught: a command routed to another's module, --debug lost after the command
    parser = cli.build_parser()
    for name, (module, _) in cli.COMMANDS.items():
        args, _ = parser.parse_known_args([name] + REQUIRED)
        assert (args.command, args._module, args.debug) == (name, module, False)
        args, _ = parser.parse_known_args(["--debug", name] + REQUIRED)
        assert args.debug is True
        args, _ = parser.parse_known_args([name, "--debug"] + REQUIRED)
        assert args.debug is True
    with pytest.raises(SystemExit) as e:
        parser.parse_args(["no-such-command"])
    assert e.value.code == cli.BAD_INPUT
