"""``deltaserve make-tiny DIR``: write the built-in tiny random Kimi-Linear checkpoint."""

from __future__ import annotations

import argparse

HELP = "write a tiny random Kimi-Linear checkpoint (config, safetensors, tokenizer) into DIR"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", help="output directory (created if needed)")
    parser.add_argument(
        "--seed", type=int, default=0, help="weights seed (default 0); the same seed gives the same bytes"
    )


def run(args: argparse.Namespace) -> int:
    from deltaserve.models.tiny import make_tiny

    path = make_tiny(args.dir, seed=args.seed)
    print(f"wrote tiny Kimi-Linear checkpoint to {path}")
    return 0
