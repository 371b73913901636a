"""``deltaserve serve --role prefill|decode``: the role's connector, ledger and routes on the normal app.

Both roles serve ``GET /disagg/handshake`` (agent metadata, wire header, region addresses) and
``GET /disagg/stats`` (the engine's counters, what is held and reserved). The prefill role adds
``/disagg/prefill`` and ``/disagg/release``; the decode role loads ``kv_transfer_params`` in the
OpenAI routes (``app.state.kv_consumer``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse

from deltaserve.state.wire import build_header, model_fingerprint

ROLES = ("prefill", "decode")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--role", default=None, choices=ROLES,
                        help="prefill/decode disaggregation: this instance's role (default: a single instance)")
    parser.add_argument("--kv-hold-timeout", type=float, default=30.0,
                        help="prefill role: seconds a finished prompt's state waits for its decode instance")
    parser.add_argument("--kv-load-timeout", type=float, default=10.0,
                        help="decode role: seconds a state transfer may take before the request fails")
    parser.add_argument("--conv-layout", default="SD", choices=("SD", "DS"),
                        help="conv state orientation in the pool (a peer with the other one is converted)")


def engine_header(engine: Any):
    """This engine's wire header (model fingerprint, state groups, block size, KV-cache spec)."""
    runner = engine.runner
    spec = runner.model.kv_cache_spec(engine.config.cache_dtype)
    return build_header(model_fingerprint(engine.config.model), runner.model.dtype, engine.config.block_size,
                        runner.state_pool.groups, spec, runner.kv_cache)


def install(app: FastAPI, engine: Any, role: str, *, hold_timeout_s: float = 30.0,
            load_timeout_s: float = 10.0) -> Any:
    """Give ``app`` (from ``create_app(engine)``) the role; returns the connector."""
    from deltaserve.disagg.connector import KVConnector
    from deltaserve.disagg.decode import KVConsumer
    from deltaserve.disagg.ledger import KVLedger
    from deltaserve.disagg.prefill import add_prefill_routes, serve_notifications

    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    tp = engine.config.tensor_parallel_size
    if tp != 1:
        # NOTE: the connector registers this process's pool, rank 0's shards only; reading every rank's
        # slices (deltaserve.state.reshard gives the ranges) is not wired into the workers yet.
        raise ValueError(f"--role {role}: prefill/decode instances run with tensor_parallel_size 1, got {tp}")
    connector = KVConnector(role, engine.runner.state_pool, engine.runner.kv_cache, engine_header(engine))
    ledger = KVLedger(engine, hold_timeout_s)
    engine.scheduler.kv_connector = ledger
    engine_loop = app.state.engine_loop
    app.state.kv_connector = connector

    @app.get("/disagg/handshake")
    async def handshake() -> JSONResponse:
        return JSONResponse(connector.handshake_info())

    @app.get("/disagg/stats")
    async def stats() -> JSONResponse:
        out = await engine_loop.call(lambda e: e.stats())
        out.update(role=role, agent_name=connector.agent_name)
        return JSONResponse(out)

    if role == "decode":
        app.state.kv_consumer = KVConsumer(connector, ledger, engine_loop, load_timeout_s)

        @app.post("/disagg/connect")
        async def connect(raw: dict) -> JSONResponse:
            """Hand-shake with a prefill instance now (the router does it for every pair it routes)."""
            peer = await app.state.kv_consumer.connect(str(raw.get("url", "")).rstrip("/"))
            return JSONResponse({"agent_name": peer.agent_name, "convert_conv": list(peer.plan.convert_conv)})
        return connector

    add_prefill_routes(app, engine, connector, ledger)
    inner = app.router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(a: FastAPI):
        async with inner(a) as state:
            task = asyncio.create_task(serve_notifications(engine_loop, connector, ledger))
            try:
                yield state
            finally:
                task.cancel()

    app.router.lifespan_context = lifespan
    return connector
