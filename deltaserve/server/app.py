"""The OpenAI-compatible HTTP app: ``create_app(engine)`` -> FastAPI.

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions`` (both with ``stream``),
``GET /v1/models``, vLLM's ``/tokenize``, ``/detokenize``, ``/tokenizer_info`` and ``/version``,
``GET /health``, ``GET /metrics``. Errors use OpenAI's shape
``{"error": {"message", "type", "param", "code"}}``; validation errors are 400, not FastAPI's 422.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from deltaserve.engine.sampling_params import MAX_N
from deltaserve.server import serving, structured
from deltaserve.server.engine_loop import EngineLoop, EngineStoppedError, RequestStream
from deltaserve.server.engine_stats import engine_stats, max_model_len, vocab_size
from deltaserve.server.middleware import DEFAULT_MAX_BODY_BYTES, ApiKeyAuth, BodySizeLimit
from deltaserve.server.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
)
from deltaserve.server.responses import EchoPrompt, ResponseBuilder
from deltaserve.server.serving import RequestError
from deltaserve.server.streams import EngineStreamResponse, collect, stream_events
from deltaserve.server.tokenizer_routes import add_tokenizer_routes
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


def _without_generated(output: Any) -> Any:
    """``max_tokens: 0`` with ``echo``: one token was generated for the prompt's logprobs; drop it."""
    completions = [dataclasses.replace(c, text="", token_ids=[], logprobs=[] if c.logprobs is not None else None,
                                       text_offsets=[] if c.text_offsets is not None else None,
                                       finish_reason="length" if c.finish_reason else None) for c in output.outputs]
    return dataclasses.replace(output, outputs=completions)


def create_app(engine: Any, served_model_name: str = "deltaserve", max_queue: int = 256, api_key: str | None = None,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
               on_engine_failure: Callable[[BaseException], None] | None = None,
               tool_call_parser: str | None = None) -> FastAPI:
    """The app around ``engine`` (an ``LLMEngine``); its step loop runs while the app's lifespan does.

    ``api_key``: required on ``/v1`` routes when set. ``on_engine_failure``: called (on the loop
    thread) when the engine fails in a way no request can be blamed for, after every open stream got
    its error; ``deltaserve serve`` exits with a non-zero status then. ``tool_call_parser``: vLLM's
    name of the model's tool-call format (``hermes``, ``kimi_k2``); default: the one the chat
    template writes, else the architecture's.
    """
    tool_parser = get_tool_parser(tool_call_parser or default_tool_parser_name(
        getattr(engine.hf_config, "architectures", None), getattr(engine.tokenizer, "chat_template", None)))
    engine_loop = EngineLoop(engine, on_failure=on_engine_failure)
    admission = Admission(engine.config.max_num_seqs, max_queue)
    context_len = max_model_len(engine)
    vocab = vocab_size(engine)
    # NOTE: tokenization runs on one worker thread, off the event loop (a 5 MB prompt once froze every
    # stream for seconds), and serially (transformers' fast tokenizers are not meant for concurrent use).
    tokenize_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="deltaserve-tokenize")
    char_limit = serving.max_prompt_chars(engine.tokenizer, context_len)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        engine_loop.start()
        yield
        # NOTE: ends running streams with an error event, then waits for the thread to stop.
        engine_loop.shutdown()
        await asyncio.to_thread(engine_loop.join, 30.0)
        tokenize_pool.shutdown(wait=False)
        # NOTE: tensor-parallel workers stop with the server (a no-op at TP 1).
        if hasattr(engine, "shutdown"):
            engine.shutdown()

    app = FastAPI(title="deltaserve", version=_version(), lifespan=lifespan)
    app.state.engine_loop = engine_loop
    app.state.tool_parser = tool_parser
    app.state.admission = admission
    if api_key:
        app.add_middleware(ApiKeyAuth, api_key=api_key)
    app.add_middleware(BodySizeLimit, max_bytes=max_body_bytes)

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
        return JSONResponse(serving.validation_error(exc.errors()).body(), status_code=400)

    def check_model(name: str | None) -> None:
        if name is not None and name != served_model_name:
            raise RequestError(f"model: the model '{name}' does not exist; the served model is '{served_model_name}'",
                               "model", status=404, code="model_not_found")

    def check_body(body: Any, scope: str) -> None:
        """What both endpoints check first: the model's name, refused fields, valid Unicode."""
        check_model(body.model)
        serving.check_refused(body, scope)
        serving.check_body_unicode(body)

    async def off_loop(fn: Callable, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(tokenize_pool, fn, *args)

    async def run(request: Request, body: Any, prompts: list[list[int]], params: Any, builder: ResponseBuilder,
                  arrival: float, transform: Callable[[Any], Any] = lambda output: output) -> Response:
        num_seqs = params.n * len(prompts)
        if not admission.acquire(num_seqs):
            engine_loop.metrics.on_rejected()
            raise RequestError(f"the server is overloaded ({admission.in_flight} sequences in flight, at most "
                               f"{admission.capacity}); retry later", status=503, type="server_overloaded",
                               code="queue_full", headers={"Retry-After": str(RETRY_AFTER_S)})
        loop = asyncio.get_running_loop()
        streams = [RequestStream(f"{builder.request_id}-{i}", loop, arrival_time=arrival) for i in range(len(prompts))]
        added: list[RequestStream] = []
        state = {"open": True}

        def close() -> None:
            if state["open"]:
                state["open"] = False
                admission.release(num_seqs)
                for stream in added:
                    if not stream.finished:
                        engine_loop.abort(stream.request_id)

        try:
            if body.kv_transfer_params is not None:
                # NOTE: a decode instance (deltaserve.disagg) loads the prompt's states and KV from its prefill peer.
                consumer = getattr(app.state, "kv_consumer", None)
                if consumer is None or len(prompts) != 1:
                    raise RequestError("kv_transfer_params: needs a decode instance (serve --role decode) and one "
                                       "prompt", "kv_transfer_params")
                prompts = [await consumer.load(builder.request_id, body.kv_transfer_params)]
            for stream, prompt_ids in zip(streams, prompts):
                added.append(stream)
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
            return EngineStreamResponse(stream_events(streams, builder, include_usage, transform), close)
        try:
            return await collect(request, streams, builder, transform)
        finally:
            close()

    @app.post("/v1/completions", response_model=CompletionResponse)
    async def completions(body: CompletionRequest, request: Request) -> Response:
        arrival = time.monotonic()
        check_body(body, "completions")
        if body.max_tokens == 0 and not body.echo:
            raise RequestError("max_tokens: 0 is only allowed with echo (the prompt's logprobs alone)", "max_tokens")
        texts = body.prompts()
        for prompt in texts:
            if isinstance(prompt, str):
                serving.check_prompt_chars(prompt, char_limit, context_len, "prompt")
        if body.n * len(texts) > MAX_N:
            raise RequestError(f"n: {body.n} choices for each of {len(texts)} prompts exceed {MAX_N} "
                               f"sequences in one request", "n")
        prompts = await off_loop(serving.completion_prompts, body, engine.tokenizer, vocab)
        echo_logprobs = body.logprobs if body.echo else None
        prompt_logprobs = max((k for k in (echo_logprobs, body.prompt_logprobs) if k is not None), default=None)
        max_tokens = 1 if body.max_tokens == 0 else body.max_tokens
        params = serving.sampling_params(body, max_tokens, max(len(ids) for _, ids in prompts), context_len,
                                         body.logprobs, "prompt", prompt_logprobs)
        params = await structured.constrain(engine, params, structured.structured_outputs_of(body))
        echo = None
        if body.echo:
            decode = engine.tokenizer.decode if engine.tokenizer is not None else (lambda ids: "")
            echo = [EchoPrompt(text if text is not None else decode(ids), ids) for text, ids in prompts]
        builder = ResponseBuilder(f"cmpl-{uuid.uuid4().hex}", served_model_name, False, body.logprobs,
                                  engine.tokenizer, n=body.n, echo=echo,
                                  with_prompt_logprobs=body.prompt_logprobs is not None)
        transform = _without_generated if body.max_tokens == 0 else (lambda output: output)
        return await run(request, body, [ids for _, ids in prompts], params, builder, arrival, transform)

    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        arrival = time.monotonic()
        check_body(body, "chat")
        if body.top_logprobs is not None and not body.logprobs:
            raise RequestError("top_logprobs: needs logprobs set to true", "top_logprobs")
        top = body.num_logprobs()
        serving.check_prompt_chars(serving.messages_text(body), char_limit, context_len, "messages")
        plan = structured.tool_plan(body, tool_parser)
        prompt_ids = await off_loop(lambda: serving.chat_prompt(body, engine.tokenizer, tools=plan.tools))
        params = serving.sampling_params(body, body.max_output_tokens(), len(prompt_ids), context_len, top, "messages")
        params = await structured.constrain(engine, params, structured.chat_constraint(body, plan), plan)
        builder = ResponseBuilder(f"chatcmpl-{uuid.uuid4().hex}", served_model_name, True, top, engine.tokenizer,
                                  n=body.n, tool_parser=tool_parser if plan.parse else None)
        return await run(request, body, [prompt_ids], params, builder, arrival)

    @app.get("/v1/models", response_model=ModelList)
    async def models() -> dict:
        return ModelList(data=[ModelCard(id=served_model_name, max_model_len=context_len)]).model_dump()

    add_tokenizer_routes(app, engine, check_model, context_len, vocab, off_loop)

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


def _version() -> str:
    import deltaserve

    return deltaserve.__version__
