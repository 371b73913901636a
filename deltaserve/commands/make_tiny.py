"""``deltaserve make-tiny DIR``: write the built-in tiny random Kimi-Linear checkpoint."""

from __future__ import annotations

import argparse

HELP = "write a tiny random checkpoint (Kimi-Linear by default; config, safetensors, tokenizer) into DIR"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from deltaserve.models.tiny import ARCHS

    parser.add_argument("dir", help="output directory (created if needed)")
    parser.add_argument(
        "--seed", type=int, default=0, help="weights seed (default 0); the same seed gives the same bytes"
    )
    parser.add_argument(
        "--arch", default="kimi_linear", choices=ARCHS,
        help="model family (default kimi_linear; qwen3_5 is the dense Qwen3.5)",
    )  # fmt: skip


def run(args: argparse.Namespace) -> int:
    from deltaserve.models.tiny import make_tiny

    path = make_tiny(args.dir, seed=args.seed, arch=args.arch)
    print(f"wrote tiny {args.arch} checkpoint to {path}")
    return 0
