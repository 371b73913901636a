"""vLLM's tokenizer endpoints and ``/version``: what clients such as lm-eval probe before they run.

``POST /tokenize`` (a ``prompt`` or chat ``messages``), ``POST /detokenize``, ``GET /tokenizer_info``
(the tokenizer's special tokens, chat template and limits) and ``GET /version``.
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable

from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict, Field

import deltaserve
from deltaserve.server import serving
from deltaserve.server.protocol import MAX_MESSAGES, ChatCompletionRequest, ChatMessage, TokenId
from deltaserve.server.serving import RequestError


class TokenizeRequest(BaseModel):
    """vLLM's ``/tokenize``: a ``prompt`` or chat ``messages``."""

    model_config = ConfigDict(strict=True, extra="ignore")

    model: str | None = Field(None, max_length=256)
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1, max_length=MAX_MESSAGES)
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    return_token_strs: bool = False


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    model: str | None = Field(None, max_length=256)
    tokens: list[TokenId] = Field(max_length=1 << 20)


class DetokenizeResponse(BaseModel):
    prompt: str


def add_tokenizer_routes(app: FastAPI, engine: Any, check_model: Callable[[str | None], None], context_len: int,
                         vocab_size: int, off_loop: Callable[..., Awaitable[Any]]) -> None:
    """``off_loop(fn, *args)`` runs ``fn`` on the server's tokenizer thread."""
    tokenizer = engine.tokenizer

    def require_tokenizer(field: str) -> None:
        if tokenizer is None:
            raise RequestError(f"{field}: the checkpoint has no tokenizer", field)

    @app.post("/tokenize", response_model=TokenizeResponse)
    async def tokenize(body: TokenizeRequest) -> dict:
        check_model(body.model)
        require_tokenizer("prompt")
        if (body.prompt is None) == (body.messages is None):
            raise RequestError("prompt: send exactly one of prompt and messages", "prompt")
        serving.check_unicode(body.prompt, "prompt")
        if body.messages is not None:
            serving.check_unicode([m.model_dump() for m in body.messages], "messages")
            chat = ChatCompletionRequest(messages=body.messages)
            ids = await off_loop(lambda: serving.chat_prompt(chat, tokenizer, add_generation_prompt=body.add_generation_prompt))
        else:
            ids = await off_loop(serving.encode, tokenizer, body.prompt, body.add_special_tokens)
        strs = tokenizer.convert_ids_to_tokens(ids) if body.return_token_strs else None
        return TokenizeResponse(count=len(ids), max_model_len=context_len, tokens=ids, token_strs=strs).model_dump()

    @app.post("/detokenize", response_model=DetokenizeResponse)
    async def detokenize(body: DetokenizeRequest) -> dict:
        check_model(body.model)
        require_tokenizer("tokens")
        bad = [t for t in body.tokens if t >= vocab_size]
        if bad:
            raise RequestError(f"tokens: token ids must be in [0, {vocab_size}), got {bad[0]}", "tokens")
        text = await off_loop(tokenizer.decode, body.tokens)
        return DetokenizeResponse(prompt=text).model_dump()

    @app.get("/tokenizer_info")
    async def tokenizer_info() -> dict:
        require_tokenizer("tokenizer")
        info = {"tokenizer_class": type(tokenizer).__name__, "model_max_length": context_len,
                "vocab_size": vocab_size}
        for name in ("eos_token", "bos_token", "pad_token", "unk_token", "chat_template"):
            value = getattr(tokenizer, name, None)
            info[name] = value if isinstance(value, str) or value is None else str(value)
        return info

    @app.get("/version")
    async def version() -> dict:
        return {"version": deltaserve.__version__}
