"""The ``deltaserve`` command: one subcommand per module under ``deltaserve.commands``."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# Each module defines ``add_arguments(parser)`` and ``run(args) -> int`` and a one-line ``HELP``.
COMMANDS = ("generate", "bench", "serve", "plan", "make_tiny")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default, unless its help already says what the default is."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default is None or action.default is False or action.default == argparse.SUPPRESS:
            return text
        return super()._get_help_string(action)


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
        cmd = sub.add_parser(name.replace("_", "-"), help=module.HELP, description=module.HELP,
                             formatter_class=HelpFormatter)
        module.add_arguments(cmd)
        cmd.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args._run(args) or 0
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # noqa: BLE001 - a command-line tool reports one line, not a traceback
        # NOTE: DELTASERVE_DEBUG=1 shows the traceback.
        if os.environ.get("DELTASERVE_DEBUG"):
            raise
        message = str(exc).strip().splitlines()
        detail = message[0] if message else ""
        print(f"deltaserve {args.command}: {type(exc).__name__}: {detail}"[:2000], file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
