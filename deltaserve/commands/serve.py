"""``deltaserve serve``: the OpenAI-compatible HTTP server (see docs/server.md)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import uvicorn

from deltaserve.commands.generate import add_engine_arguments, engine_kwargs
from deltaserve.disagg.roles import add_arguments as add_role_arguments
from deltaserve.server.middleware import DEFAULT_MAX_BODY_BYTES
from deltaserve.server.tool_parsers import TOOL_PARSERS

logger = logging.getLogger("deltaserve.serve")

HELP = "Serve a model over an OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions)."


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def port_number(text: str) -> int:
    """argparse type: a TCP port in [0, 65535] (0 = any free port)."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer in [0, 65535], got {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"must be in [0, 65535], got {port}")
    return port


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_engine_arguments(parser)
    parser.add_argument("--served-model-name", default=None,
                        help="the model name clients send (default: the dir's name, deltaserve-tiny without --model)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind; set --api-key on any non-loopback one")
    parser.add_argument("--port", type=port_number, default=8000, help="TCP port to listen on")
    parser.add_argument("--api-key", default=os.environ.get("DELTASERVE_API_KEY"),
                        help="require 'Authorization: Bearer KEY' on /v1 routes (default: $DELTASERVE_API_KEY)")
    parser.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES,
                        help="larger request bodies get 413")
    parser.add_argument("--max-queue", type=int, default=256,
                        help="sequences that may wait beyond --max-num-seqs; more get 503 with Retry-After")
    parser.add_argument("--tool-call-parser", default=None, choices=sorted(TOOL_PARSERS),
                        help="the model's tool-call format (default: the one its chat template writes, else "
                             "the architecture's: kimi_k2 for Kimi Linear, hermes for Qwen)")
    parser.add_argument("--no-prefix-caching", action="store_true", help="turn the prefix cache off")
    parser.add_argument("--seed", type=int, default=0, help="seed of the engine's sampler (requests may set their own)")
    parser.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"), help="log level")
    add_role_arguments(parser)


def build_server(args: argparse.Namespace) -> "GracefulServer":
    """The engine, the app and a uvicorn server whose exit signal also ends running streams."""
    from deltaserve.config import EngineConfig
    from deltaserve.engine.llm_engine import LLMEngine
    from deltaserve.server.app import create_app

    if args.max_body_bytes < 1:
        raise ValueError(f"--max-body-bytes must be >= 1, got {args.max_body_bytes}")
    kwargs = engine_kwargs(args)
    if args.conv_layout != "SD":
        kwargs["extra"] = {**kwargs.get("extra", {}), "conv_layout": args.conv_layout}
    config = EngineConfig(**kwargs, seed=args.seed, enable_prefix_caching=not args.no_prefix_caching)
    engine = LLMEngine(config)
    name = args.served_model_name or (Path(args.model).resolve().name if args.model else "deltaserve-tiny")
    holder: dict = {}

    def on_engine_failure(exc: BaseException) -> None:
        # NOTE: the engine cannot go on; end the process (non-zero) so that a supervisor restarts it,
        # rather than answering 503 forever.
        logger.error("the engine failed (%s: %s); shutting down", type(exc).__name__, exc)
        holder["server"].should_exit = True

    app = create_app(engine, served_model_name=name, max_queue=args.max_queue, api_key=args.api_key or None,
                     max_body_bytes=args.max_body_bytes, on_engine_failure=on_engine_failure,
                     tool_call_parser=args.tool_call_parser)
    if args.role is not None:
        from deltaserve.disagg.roles import install

        install(app, engine, args.role, hold_timeout_s=args.kv_hold_timeout, load_timeout_s=args.kv_load_timeout)
    uv_config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                               timeout_graceful_shutdown=10)
    holder["server"] = server = GracefulServer(uv_config, app.state.engine_loop)
    stats = engine.get_metrics()
    cfg = engine.config
    logger.info("serving %s as '%s' on http://%s:%d: max_model_len %d, %d state slots (%d for requests), "
                "KV cache %d blocks x %d = %d tokens, max_num_seqs %d, dtype %s on %s", cfg.model, name, args.host,
                args.port, cfg.max_model_len, stats["state_slots_total"], cfg.max_num_seqs, cfg.num_kv_blocks,
                cfg.block_size, cfg.num_kv_blocks * cfg.block_size, cfg.max_num_seqs, next(
                    engine.runner.model.parameters()).dtype, cfg.device)
    if args.host not in LOOPBACK and not args.api_key:
        logger.warning("listening on %s without --api-key: anyone who can reach it can use it", args.host)
    return server


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
    except (ValueError, OSError, RuntimeError) as exc:
        print(f"deltaserve serve: {exc}", file=sys.stderr)
        return 2
    try:
        server.run()
    except KeyboardInterrupt:
        # NOTE: uvicorn re-raises the SIGINT it handled once shut down; as `uvicorn.run` does, end quietly.
        pass
    if server.engine_loop.error is not None:
        return 1
    # NOTE: uvicorn returns (without raising) when it cannot bind the address; it logged why.
    return 0 if server.started else 1
