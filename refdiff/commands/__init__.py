"""One module per `refdiff` subcommand: `add_arguments(parser)` and `run(args) -> int`."""
