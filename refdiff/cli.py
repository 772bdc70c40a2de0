"""The `refdiff` command: one subcommand per module in refdiff/commands/.

Each command module defines `add_arguments(parser)` and `run(args) -> int`; the list
below maps subcommand names to modules (imported only when used, so `refdiff --help`
stays fast). Bad flags and values are rejected by argparse with a clear message; errors
raised as ValueError (bad input, bad checkpoint, missing data) print one line and exit 2.
"""
from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "ring": ("refdiff.commands.ring", "train a score model on 2-D toy data, sample, score (report §2.5.1)"),
    "train": ("refdiff.commands.train", "train a model on images (DDPM UNet, VAE, GAN, classifier)"),
    "sample": ("refdiff.commands.sample", "draw images from a trained checkpoint"),
    "evaluate": ("refdiff.commands.evaluate", "score a file of images with the MNIST classifier"),
    "compare": ("refdiff.commands.compare", "table 3.2 of the report: real vs VAE vs GAN vs DDPM"),
}


def build_parser():
    parser = argparse.ArgumentParser(prog="refdiff", description="Score-based diffusion models, by hand.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(_module=module)
        try:
            importlib.import_module(module).add_arguments(p)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
            p.set_defaults(_missing=True)   # a command not written yet
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "_missing", False):
        parser.error(f"command {args.command!r} is not available in this build")
    module = importlib.import_module(args._module)
    try:
        return int(module.run(args) or 0)
    except (ValueError, FileNotFoundError) as exc:
        print(f"refdiff {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\nrefdiff {args.command}: interrupted; the last checkpoint is intact (use --resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
