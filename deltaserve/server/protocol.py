"""Request and response bodies of the OpenAI-compatible API (the fields deltaserve supports).

Field names, defaults and ranges follow OpenAI's API reference; ``top_k``, ``min_p``, ``min_tokens``,
``repetition_penalty``, ``ignore_eos``, ``stop_token_ids``, ``include_stop_str_in_output``,
``skip_special_tokens`` and ``prompt_logprobs`` are vLLM's extensions (the ``openai`` client sends
them through ``extra_body``). Types are strict (``"2"`` is not an integer, ``true`` is not a token
id) and every number is bounded. Fields in ``REFUSED_FIELDS`` are refused with 400 naming them;
other unknown fields (such as ``user``) are ignored, as vLLM does.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_serializer

from deltaserve.engine.sampling_params import (
    MAX_INT32,
    MAX_LOGIT_BIAS_ENTRIES,
    MAX_LOGPROBS,
    MAX_N,
    MAX_REPETITION_PENALTY,
    MAX_SEED,
    MAX_STOP_STRING_CHARS,
    MAX_STOP_STRINGS,
    MAX_STOP_TOKEN_IDS,
    MIN_SEED,
)
from deltaserve.server.structured_fields import StructuredOutputFields, ToolFields

MAX_PROMPTS = 64  # prompts in one /v1/completions request (lm-eval sends --batch_size of them)
MAX_MESSAGES = 1024

# NOTE: the one place for fields that would change the output but are not implemented: each is
# refused with 400 naming it unless absent, null, or one of its no-op values. ``scope`` is
# "completions", "chat" or "both".
REFUSED_FIELDS: dict[str, tuple[str, tuple]] = {
    "tools": ("completions", ([],)),
    "tool_choice": ("completions", ("none",)),
    "parallel_tool_calls": ("completions", ()),
    "functions": ("both", ([],)),
    "function_call": ("both", ("none",)),
    "guided_whitespace_pattern": ("both", ()),
    "suffix": ("completions", ("",)),
    "best_of": ("both", (1,)),
    "use_beam_search": ("both", (False,)),
    "length_penalty": ("both", (1.0,)),
    "bad_words": ("both", ([],)),
    "allowed_token_ids": ("both", ()),
    "truncate_prompt_tokens": ("both", ()),
    "prompt_embeds": ("completions", ()),
    "return_tokens_as_token_ids": ("both", (False,)),
    "spaces_between_special_tokens": ("both", (True,)),
    "logits_processors": ("both", ()),
    "echo": ("chat", (False,)),
    "prompt_logprobs": ("chat", ()),
    "chat_template": ("chat", ()),
    "chat_template_kwargs": ("chat", ({},)),
    "add_generation_prompt": ("chat", (True,)),
    "continue_final_message": ("chat", (False,)),
    "documents": ("chat", ()),
    "prediction": ("chat", ()),
    "audio": ("chat", ()),
    "modalities": ("chat", (["text"],)),
    "reasoning_effort": ("chat", ()),
    "web_search_options": ("chat", ()),
}

TokenId = Annotated[int, Field(ge=0, le=MAX_INT32)]
StopString = Annotated[str, Field(min_length=1, max_length=MAX_STOP_STRING_CHARS)]


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    include_usage: bool = False


class SamplingFields(StructuredOutputFields):
    """Fields that both endpoints share; validated ranges are OpenAI's (vLLM's for its extensions)."""

    model_config = ConfigDict(strict=True, extra="allow", allow_inf_nan=False)

    model: str | None = Field(None, max_length=256)
    n: int = Field(1, ge=1, le=MAX_N)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(-1, ge=-1, le=MAX_INT32)
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    seed: int | None = Field(None, ge=MIN_SEED, le=MAX_SEED)
    stop: StopString | Annotated[list[StopString], Field(max_length=MAX_STOP_STRINGS)] | None = None
    stop_token_ids: list[TokenId] | None = Field(None, max_length=MAX_STOP_TOKEN_IDS)
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0, le=MAX_INT32)
    repetition_penalty: float = Field(1.0, gt=0.0, le=MAX_REPETITION_PENALTY)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    # NOTE: OpenAI's shape: token ids as JSON object keys (strings), biases in [-100, 100].
    logit_bias: Annotated[dict[Annotated[str, Field(pattern=r"^[0-9]{1,10}$")], Annotated[float, Field(
        ge=-100, le=100)]], Field(max_length=MAX_LOGIT_BIAS_ENTRIES)] | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, max_length=256)
    # vLLM's field for prefill/decode disaggregation: what the prefill instance returned (decode role only).
    kv_transfer_params: dict[str, Any] | None = None

    def refused_field(self, scope: str) -> str | None:
        """The first field of ``REFUSED_FIELDS`` (for ``scope``) set away from its no-op values, or None."""
        extra = self.model_extra or {}
        for name, (where, no_op) in REFUSED_FIELDS.items():
            if where not in ("both", scope):
                continue
            value = extra[name] if name in extra else getattr(self, name, None)
            if value is not None and not any(value == v and type(value) is type(v) for v in no_op):
                return name
        return None

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def logit_bias_ids(self) -> dict[int, float] | None:
        return {int(token): bias for token, bias in self.logit_bias.items()} if self.logit_bias else None


class CompletionRequest(SamplingFields):
    # NOTE: a text, a list of texts, a list of token ids, or a list of token-id lists; each prompt is
    # one engine request and the choices are indexed prompt by prompt, as OpenAI does.
    prompt: (Annotated[str, Field(min_length=1)] | Annotated[list[Annotated[str, Field(min_length=1)]], Field(
        min_length=1, max_length=MAX_PROMPTS)] | Annotated[list[TokenId], Field(min_length=1)]
        | Annotated[list[Annotated[list[TokenId], Field(min_length=1)]], Field(min_length=1, max_length=MAX_PROMPTS)])
    # NOTE: 0 only with echo (the prompt's logprobs alone, as lm-eval's loglikelihood asks).
    max_tokens: int | None = Field(16, ge=0, le=MAX_INT32)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    prompt_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    add_special_tokens: bool = True

    def prompts(self) -> list[str | list[int]]:
        prompt = self.prompt
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            return [prompt]
        return list(prompt)


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    # NOTE: content parts are accepted when they are all text (joined), as the template needs text.
    content: str | list[dict[str, Any]] | None = None


class ChatCompletionRequest(SamplingFields, ToolFields):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_tokens: int | None = Field(None, ge=1, le=MAX_INT32)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_INT32)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)

    def max_output_tokens(self) -> int | None:
        """``max_completion_tokens`` (OpenAI's current name), else ``max_tokens``; None: the rest of the context."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def num_logprobs(self) -> int | None:
        """The engine's ``logprobs`` (top-k per token) for chat's ``logprobs`` / ``top_logprobs``."""
        return (self.top_logprobs or 0) if self.logprobs else None


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0  # prompt tokens restored from the prefix cache


class UsageInfo(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] = []
    text_offset: list[int] = []


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    # vLLM's: per prompt token ``{token_id: {"logprob", "rank", "decoded_token"}}``, the first None.
    prompt_logprobs: list[dict[str, dict[str, Any]] | None] | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = []


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    tool_calls: list[dict[str, Any]] = []


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[dict[str, Any]] | None = None

    # NOTE: unset fields are left out, as OpenAI sends them: the closing chunk's delta is ``{}``.
    @model_serializer
    def _without_unset(self) -> dict:
        fields = (("role", self.role), ("content", self.content), ("tool_calls", self.tool_calls))
        return {k: v for k, v in fields if v is not None}


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChunkChoice]
    usage: UsageInfo | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "deltaserve"
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
