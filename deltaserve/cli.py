"""The ``deltaserve`` command: one subcommand per module under ``deltaserve.commands``."""

from __future__ import annotations

import argparse
import importlib
import sys

# Each module defines ``add_arguments(parser)`` and ``run(args) -> int`` and a one-line ``HELP``.
COMMANDS = ("generate", "bench", "serve", "router", "plan", "make_tiny")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deltaserve", description="Serve hybrid linear-attention language models.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"deltaserve.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"deltaserve.commands.{name}":
                continue  # not built yet
            raise
        cmd = sub.add_parser(name.replace("_", "-"), help=module.HELP, description=module.HELP)
        module.add_arguments(cmd)
        cmd.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args._run(args) or 0


if __name__ == "__main__":
    sys.exit(main())
