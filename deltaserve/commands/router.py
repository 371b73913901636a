"""``deltaserve router``: OpenAI routes in front of prefill and decode instances (docs/disaggregation.md)."""

from __future__ import annotations

import argparse
import logging
import sys

from deltaserve.commands.serve import port_number

HELP = "Route OpenAI requests through prefill instances to decode instances (prefill/decode disaggregation)."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prefill", action="append", required=True, metavar="URL",
                        help="a prefill instance (serve --role prefill), e.g. http://127.0.0.1:8001; repeat for more")
    parser.add_argument("--decode", action="append", required=True, metavar="URL",
                        help="a decode instance (serve --role decode); repeat for more")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=port_number, default=8000)
    parser.add_argument("--health-interval", type=float, default=1.0, help="seconds between health checks")
    parser.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from deltaserve.disagg.router import create_router_app

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        for url in args.prefill + args.decode:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"instance URL {url!r} must start with http:// or https://")
        app = create_router_app(args.prefill, args.decode, health_interval_s=args.health_interval)
    except ValueError as exc:
        print(f"deltaserve router: {exc}", file=sys.stderr)
        return 2
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5)
    except KeyboardInterrupt:
        pass
    return 0
