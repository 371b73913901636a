"""The OpenAI-compatible HTTP app: ``create_app(engine)`` -> FastAPI.

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions`` (both with ``stream``),
``GET /v1/models``, ``GET /health``, ``GET /metrics``. Errors use OpenAI's shape
``{"error": {"message", "type", "param", "code"}}``; validation errors are 400, not FastAPI's 422.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from typing import Any, AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from deltaserve.server import serving, structured
from deltaserve.server.engine_loop import EngineLoop, EngineStoppedError, RequestStream
from deltaserve.server.engine_stats import engine_stats, max_model_len, vocab_size
from deltaserve.server.protocol import ChatCompletionRequest, CompletionRequest, ModelCard, ModelList
from deltaserve.server.responses import ResponseBuilder, sse
from deltaserve.server.serving import RequestError
from deltaserve.server.tool_parsers import default_tool_parser_name, get_tool_parser


RETRY_AFTER_S = 1


class Admission:
    """A bounded queue: at most ``max_num_seqs + max_queue`` sequences admitted (event loop only)."""

    def __init__(self, max_num_seqs: int, max_queue: int):
        self.capacity = max_num_seqs + max_queue
        self.in_flight = 0

    def acquire(self, num_seqs: int) -> bool:
        if self.in_flight + num_seqs > self.capacity:
            return False
        self.in_flight += num_seqs
        return True

    def release(self, num_seqs: int) -> None:
        self.in_flight -= num_seqs


class _EngineStreamResponse(StreamingResponse):
    """A streaming response that runs ``on_close`` however it ends (done, client gone, cancelled)."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None]):
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


async def _wait_for_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def create_app(engine: Any, served_model_name: str = "deltaserve", max_queue: int = 256,
               tool_call_parser: str | None = None) -> FastAPI:
    """The app around ``engine`` (an ``LLMEngine``); its step loop runs while the app's lifespan does.

    ``tool_call_parser``: vLLM's name of the model's tool-call format (``hermes``, ``kimi_k2``);
    default: the one the chat template writes, else the architecture's.
    """
    tool_parser = get_tool_parser(tool_call_parser or default_tool_parser_name(
        getattr(engine.hf_config, "architectures", None), getattr(engine.tokenizer, "chat_template", None)))
    engine_loop = EngineLoop(engine)
    admission = Admission(engine.config.max_num_seqs, max_queue)
    context_len = max_model_len(engine)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        engine_loop.start()
        yield
        # NOTE: ends running streams with an error event, then waits for the thread to stop.
        engine_loop.shutdown()
        await asyncio.to_thread(engine_loop.join, 30.0)
        # NOTE: tensor-parallel workers stop with the server (a no-op at TP 1).
        if hasattr(engine, "shutdown"):
            engine.shutdown()

    app = FastAPI(title="deltaserve", lifespan=lifespan)
    app.state.engine_loop = engine_loop
    app.state.admission = admission

    @app.exception_handler(RequestError)
    async def _request_error(request: Request, exc: RequestError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        error = RequestError(f"{request.method} {request.url.path}: {exc.detail}", status=exc.status_code,
                             type="invalid_request_error" if exc.status_code < 500 else "server_error")
        return JSONResponse(error.body(), status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(_validation_message(exc.errors()).body(), status_code=400)

    def check_model(name: str | None) -> None:
        if name is not None and name != served_model_name:
            raise RequestError(f"model: '{name}' is not served here; the served model is '{served_model_name}'",
                               "model", code="model_not_found")

    async def run(
        request: Request, body: Any, prompt_ids: list[int], params: Any, builder: ResponseBuilder, arrival: float
    ) -> Response:
        if not admission.acquire(params.n):
            engine_loop.metrics.on_rejected()
            raise RequestError(f"the server is overloaded ({admission.in_flight} sequences in flight, at most "
                               f"{admission.capacity}); retry later", status=503, type="server_overloaded",
                               code="queue_full", headers={"Retry-After": str(RETRY_AFTER_S)})
        stream = RequestStream(builder.request_id, asyncio.get_running_loop(), arrival_time=arrival)
        state = {"open": True}

        def close() -> None:
            if state["open"]:
                state["open"] = False
                admission.release(params.n)
                if not stream.finished:
                    engine_loop.abort(stream.request_id)

        try:
            await engine_loop.add_request(stream, prompt_ids, params)
        except ValueError as exc:
            close()
            raise RequestError(str(exc), serving.guess_param(str(exc))) from exc
        except EngineStoppedError as exc:
            close()
            raise RequestError(str(exc), status=503, type="server_unavailable",
                               headers={"Retry-After": str(RETRY_AFTER_S)}) from exc
        except BaseException:
            close()
            raise
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return _EngineStreamResponse(_stream_events(stream, builder, params.n, include_usage), close)
        try:
            return await _collect(request, stream, builder)
        finally:
            close()

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        arrival = time.monotonic()
        check_model(body.model)
        prompt_ids = serving.completion_prompt(body, engine.tokenizer, vocab_size(engine))
        params = serving.sampling_params(body, body.max_tokens, len(prompt_ids), context_len, body.logprobs, "prompt")
        params = await structured.constrain(engine, params, structured.structured_outputs_of(body))
        builder = ResponseBuilder(f"cmpl-{uuid.uuid4().hex}", served_model_name, False, body.logprobs, engine.tokenizer)
        return await run(request, body, prompt_ids, params, builder, arrival)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        arrival = time.monotonic()
        check_model(body.model)
        if body.top_logprobs is not None and not body.logprobs:
            raise RequestError("top_logprobs: needs logprobs set to true", "top_logprobs")
        top = (body.top_logprobs or 0) if body.logprobs else None
        plan = structured.tool_plan(body, tool_parser)
        prompt_ids = serving.chat_prompt(body, engine.tokenizer, tools=plan.tools)
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        params = serving.sampling_params(body, max_tokens, len(prompt_ids), context_len, top, "messages")
        params = await structured.constrain(engine, params, structured.chat_constraint(body, plan), plan)
        builder = ResponseBuilder(f"chatcmpl-{uuid.uuid4().hex}", served_model_name, True, top, engine.tokenizer,
                                  tool_parser=tool_parser if plan.parse else None)
        return await run(request, body, prompt_ids, params, builder, arrival)

    @app.get("/v1/models")
    async def models() -> dict:
        return ModelList(data=[ModelCard(id=served_model_name, max_model_len=context_len)]).model_dump()

    @app.get("/health")
    async def health() -> Response:
        if engine_loop.is_alive:
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "unavailable", "error": repr(engine_loop.error)}, status_code=503)

    @app.get("/metrics")
    async def metrics() -> Response:
        stats = await engine_loop.call(engine_stats)
        return PlainTextResponse(engine_loop.metrics.render(stats, served_model_name),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    return app


async def _stream_events(
    stream: RequestStream, builder: ResponseBuilder, n: int, include_usage: bool
) -> AsyncIterator[str]:
    for event in builder.first_chunks(n):
        yield event
    while True:
        item = _latest(await stream.outputs.get(), stream.outputs)
        if isinstance(item, BaseException):
            stream.finished = True  # nothing left to abort: the engine loop dropped it
            yield sse(RequestError(str(item), type="server_error", code="engine_stopped").body())
            break
        for event in builder.chunks(item):
            yield event
        if item.finished:
            stream.finished = True
            if include_usage:
                yield builder.usage_chunk(item)
            break
    yield sse("[DONE]")


def _latest(item: Any, outputs: asyncio.Queue) -> Any:
    """The newest of the queued outputs: they are cumulative, so a slow reader skips the ones between.

    An exception is never skipped (it is always the last item the loop thread sends).
    """
    while not isinstance(item, BaseException) and not getattr(item, "finished", False) and not outputs.empty():
        item = outputs.get_nowait()
    return item


async def _collect(request: Request, stream: RequestStream, builder: ResponseBuilder) -> Response:
    """Wait for the final output; a client that leaves first gets its request aborted (by the caller)."""
    disconnected = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        while True:
            getter = asyncio.ensure_future(stream.outputs.get())
            done, _ = await asyncio.wait({getter, disconnected}, return_when=asyncio.FIRST_COMPLETED)
            if getter not in done:
                getter.cancel()
                return Response(status_code=499)  # nobody reads it
            item = _latest(getter.result(), stream.outputs)
            if isinstance(item, BaseException):
                stream.finished = True
                raise RequestError(str(item), status=503, type="server_error", code="engine_stopped")
            if item.finished:
                stream.finished = True
                return JSONResponse(builder.response(item))
    finally:
        disconnected.cancel()


def _validation_message(errors: list[dict]) -> RequestError:
    """OpenAI's error shape from pydantic's first error, naming the field and what was wrong."""
    error = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": ""}
    loc = [str(part) for part in error.get("loc", ()) if part != "body"]
    if error.get("type") == "json_invalid":
        detail = error.get("ctx", {}).get("error", error.get("msg"))
        return RequestError(f"malformed JSON body: {detail}", None, code="json_invalid")
    if not loc:
        return RequestError(f"request body: {error.get('msg')}")
    field = loc[0]
    path = ".".join(loc[:1] + [p for p in loc[1:] if not p.startswith(("str", "list", "int", "function"))])
    got = repr(error.get("input"))
    got = got if len(got) <= 80 else got[:77] + "..."
    if error.get("type") == "missing":
        return RequestError(f"{path}: field required", field)
    return RequestError(f"{path}: {error.get('msg')} (got {got})", field)
