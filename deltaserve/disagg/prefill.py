"""The prefill role: compute a prompt and its first token, keep the states and blocks for the decode side.

``POST /disagg/prefill`` takes ``{"endpoint": "completions" | "chat", "body": <the OpenAI body>}``,
runs the prompt (``max_tokens = 1``; a prefix-cache hit works as usual) and answers with the
``kv_transfer_params`` a decode instance needs. The request's slot and blocks stay held until the
decode side's READ completes (a NIXL notification), it asks for a release (``POST /disagg/release``),
or ``hold_timeout_s`` passes.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from deltaserve.disagg.connector import KVConnector
from deltaserve.disagg.ledger import KVLedger
from deltaserve.server import serving, structured
from deltaserve.server.engine_loop import EngineStoppedError
from deltaserve.server.request_stream import RequestStream
from deltaserve.server.engine_stats import max_model_len, vocab_size
from deltaserve.server.protocol import ChatCompletionRequest, CompletionRequest
from deltaserve.server.serving import RequestError

logger = logging.getLogger(__name__)

# NOTE: polling also drives UCX progress (the agents run without a progress thread, which would
# spin a core each): fast while a consumer may be reading, slow when nothing is held.
NOTIF_POLL_S = 0.001
IDLE_POLL_S = 0.05
EXPIRE_POLL_S = 0.25


async def _prompt_and_params(app: FastAPI, engine: Any, endpoint: Any, raw: Any) -> tuple[list[int], Any]:
    """The prompt token ids and the sampling params (one token) of an OpenAI body, as ``serve`` reads it
    (chat template with tools, structured-output constraints: the first token obeys them too)."""
    models = {"completions": CompletionRequest, "chat": ChatCompletionRequest}
    if endpoint not in models:
        raise RequestError(f"endpoint: must be one of {sorted(models)}, got {endpoint!r}", "endpoint")
    try:
        body = models[endpoint].model_validate(raw)
    except ValidationError as exc:
        raise serving.validation_error(exc.errors()) from None
    if body.n != 1:
        raise RequestError(f"n: a disaggregated request has one sequence (n = 1), got {body.n}", "n")
    # NOTE: only what the prompt and its first token need; the decode instance validates the whole
    # request again as `serve` does (a refusal there makes the router drop what is held here).
    plan = None
    if endpoint == "completions":
        prompts = serving.completion_prompts(body, engine.tokenizer, vocab_size(engine))
        if len(prompts) != 1:
            raise RequestError(f"prompt: a disaggregated request has one prompt, got {len(prompts)}", "prompt")
        prompt = prompts[0][1]
        logprobs, field, max_tokens = body.logprobs, "prompt", body.max_tokens
        constraint = structured.structured_outputs_of(body)
    else:
        plan = structured.tool_plan(body, app.state.tool_parser)
        prompt = serving.chat_prompt(body, engine.tokenizer, tools=plan.tools)
        logprobs, field, max_tokens = body.num_logprobs(), "messages", body.max_output_tokens()
        constraint = structured.chat_constraint(body, plan)
    # NOTE: the full request's length is checked here too, so that it fails before any transfer.
    serving.sampling_params(body, max_tokens, len(prompt), max_model_len(engine), logprobs, field)
    params = serving.sampling_params(body, 1, len(prompt), max_model_len(engine), logprobs, field)
    return prompt, await structured.constrain(engine, params, constraint, plan)


def add_prefill_routes(app: FastAPI, engine: Any, connector: KVConnector, ledger: KVLedger) -> None:
    engine_loop = app.state.engine_loop

    @app.post("/disagg/prefill")
    async def prefill(raw: dict, request: Request) -> JSONResponse:
        prompt, params = await _prompt_and_params(app, engine, raw.get("endpoint"), raw.get("body"))
        request_id = f"pd-{uuid.uuid4().hex}"
        stream = RequestStream(request_id, asyncio.get_running_loop())
        ledger.expect(request_id)
        try:
            await engine_loop.add_request(stream, prompt, params)
            while True:
                item = await stream.next()
                if isinstance(item, BaseException):
                    raise RequestError(str(item), status=503, type="server_error", code="engine_stopped")
                if item.finished:
                    stream.finished = True
                    break
        except ValueError as exc:
            raise RequestError(str(exc), serving.guess_param(str(exc))) from exc
        except EngineStoppedError as exc:
            raise RequestError(str(exc), status=503, type="server_unavailable") from exc
        finally:
            ledger.forget(request_id)
            if not stream.finished:
                engine_loop.abort(request_id)  # NOTE: the router left; nothing is held for an aborted request
        held = ledger.held.get(request_id)
        if held is None:
            raise RequestError(f"request {request_id} finished without its state held "
                               f"({item.outputs[0].finish_reason})", status=500, type="server_error")
        return JSONResponse({"kv_transfer_params": {
            "remote_agent": connector.agent_name,
            "remote_request_id": request_id,
            "remote_slot": held.slot,
            "remote_block_ids": held.block_ids,
            "prompt_token_ids": held.prompt_token_ids,
            "first_token": list(held.first_token),
        }})

    @app.post("/disagg/release")
    async def release(raw: dict) -> JSONResponse:
        request_id = raw.get("request_id")
        if not isinstance(request_id, str):
            raise RequestError("request_id: must be the remote_request_id string", "request_id")
        released = await engine_loop.call(lambda e: ledger.release(request_id))
        return JSONResponse({"released": released})


async def serve_notifications(engine_loop: Any, connector: KVConnector, ledger: KVLedger) -> None:
    """Free what consumers have read (NIXL notifications) and what they never came for (timeouts)."""
    last_expire = 0.0
    loop = asyncio.get_running_loop()
    while True:
        try:
            done = connector.get_finished_sending()
            if done:
                await engine_loop.call(lambda e: [ledger.release(rid) for rid in done])
            if loop.time() - last_expire > EXPIRE_POLL_S:
                last_expire = loop.time()
                if ledger.held:
                    late = await engine_loop.call(lambda e: ledger.expire())
                    if late:
                        logger.warning("released %d held requests nobody read: %s", len(late), late[:4])
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - keep serving; the next poll retries
            logger.exception("notification poll failed")
        await asyncio.sleep(NOTIF_POLL_S if ledger.held else IDLE_POLL_S)
