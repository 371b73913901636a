"""``deltaserve serve``: the OpenAI-compatible HTTP server (see docs/server.md)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import uvicorn

from deltaserve.commands.generate import add_engine_arguments, engine_kwargs

HELP = "Serve a model over an OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions)."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_engine_arguments(parser)
    parser.add_argument("--served-model-name", default=None,
                        help="the model name clients send (default: the dir's name)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max-queue", type=int, default=256,
                        help="sequences that may wait beyond --max-num-seqs; more get 503 with Retry-After")
    parser.add_argument("--tool-call-parser", default=None, choices=("hermes", "kimi_k2"),
                        help="the model's tool-call format (default: the one its chat template writes, else "
                             "the architecture's: kimi_k2 for Kimi Linear, hermes for Qwen)")
    parser.add_argument("--no-prefix-caching", action="store_true", help="turn the prefix cache off")
    parser.add_argument("--seed", type=int, default=0, help="seed of the engine's sampler (requests may set their own)")
    parser.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))


def build_server(args: argparse.Namespace) -> "GracefulServer":
    """The engine, the app and a uvicorn server whose exit signal also ends running streams."""
    from deltaserve.config import EngineConfig
    from deltaserve.engine.llm_engine import LLMEngine
    from deltaserve.server.app import create_app

    config = EngineConfig(**engine_kwargs(args), seed=args.seed, enable_prefix_caching=not args.no_prefix_caching)
    engine = LLMEngine(config)
    name = args.served_model_name or (Path(args.model).resolve().name if args.model else "deltaserve-tiny")
    app = create_app(engine, served_model_name=name, max_queue=args.max_queue, tool_call_parser=args.tool_call_parser)
    uv_config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                               timeout_graceful_shutdown=10)
    return GracefulServer(uv_config, app.state.engine_loop)


class GracefulServer(uvicorn.Server):
    """uvicorn's server; on SIGINT/SIGTERM it also stops the engine loop at once.

    NOTE: uvicorn waits for open responses before the lifespan shutdown runs, so a stream would keep
    the server up until its last token; stopping the loop here ends every stream with an error event
    right away. ``EngineLoop.shutdown`` only enqueues a command, which is safe in a signal handler.
    """

    def __init__(self, config: uvicorn.Config, engine_loop):
        super().__init__(config)
        self.engine_loop = engine_loop

    def handle_exit(self, sig, frame) -> None:
        self.engine_loop.shutdown("the server is shutting down")
        super().handle_exit(sig, frame)


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        server = build_server(args)
    except ValueError as exc:
        print(f"deltaserve serve: {exc}", file=sys.stderr)
        return 2
    try:
        server.run()
    except KeyboardInterrupt:
        # NOTE: uvicorn re-raises the SIGINT it handled once shut down; as `uvicorn.run` does, end quietly.
        pass
    return 0
