"""From an HTTP request body to the engine's inputs: prompt token ids and ``SamplingParams``.

Every refusal is a ``RequestError`` naming the field (``param``) and the allowed range, answered
with OpenAI's error shape by the app.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from deltaserve.server.protocol import ChatCompletionRequest, CompletionRequest, SamplingFields


class RequestError(Exception):
    """A request the server refuses; ``status`` 400 unless said otherwise (503: overloaded)."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 type: str = "invalid_request_error", code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.message, self.param, self.status = message, param, status
        self.type, self.code, self.headers = type, code, headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def encode(tokenizer: Any, text: str, add_special_tokens: bool = True, field: str = "prompt") -> list[int]:
    if tokenizer is None:
        raise RequestError(f"{field}: the checkpoint has no tokenizer; send the prompt as token ids", field)
    # NOTE: the same call as LLMEngine._tokenize, so a text prompt gives the ids LLM.generate sees.
    return list(tokenizer.encode(text, add_special_tokens=add_special_tokens))


def check_unicode(value: Any, field: str) -> None:
    """400 for a string with a lone surrogate (JSON's ``"\\ud800"``): it cannot be UTF-8, so neither
    the tokenizer nor the response could carry it."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise RequestError(f"{field}: the text is not valid Unicode ({exc.reason} at character {exc.start})",
                               field, code="invalid_unicode") from exc
    elif isinstance(value, dict):
        for key, item in value.items():
            check_unicode(key, field)
            check_unicode(item, field)
    elif isinstance(value, (list, tuple)):
        for item in value:
            check_unicode(item, field)
    elif isinstance(value, BaseModel):
        check_unicode(value.model_dump(), field)


def check_body_unicode(body: BaseModel) -> None:
    """``check_unicode`` for every field of a request body (its ignored extras too)."""
    for name, value in body:
        check_unicode(value, name)
    for name, value in (body.model_extra or {}).items():
        check_unicode(value, name)


def max_prompt_chars(tokenizer: Any, max_model_len: int) -> int:
    """The most characters a text that fits ``max_model_len`` tokens can have: the longest token's
    text times the context (twice, for normalisers). Longer texts are refused before tokenizing them
    (a 5 MB prompt takes the tiny byte tokenizer 24 s)."""
    if tokenizer is None:
        return 0
    try:
        texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    except Exception:  # noqa: BLE001 - a tokenizer that cannot decode every id alone: no early check
        return 0
    return 2 * max_model_len * max(1, max((len(t) for t in texts), default=1))


def check_prompt_chars(text: str, limit: int, max_model_len: int, field: str) -> None:
    if limit and len(text) > limit:
        raise RequestError(f"{field}: {len(text)} characters cannot fit the model's context of {max_model_len} "
                           f"tokens (at most {limit} characters could)", field, code="context_length_exceeded")


def completion_prompts(body: CompletionRequest, tokenizer: Any, vocab_size: int) -> list[tuple[str | None, list[int]]]:
    """``(text or None, token ids)`` per prompt: text is tokenized as ``LLM.generate`` does (with
    ``add_special_tokens``); ids are range-checked. Runs off the event loop (a long prompt takes time)."""
    out = []
    prompts = body.prompts()
    for index, prompt in enumerate(prompts):
        if isinstance(prompt, str):
            out.append((prompt, encode(tokenizer, prompt, body.add_special_tokens)))
            continue
        bad = [t for t in prompt if not 0 <= t < vocab_size]
        if bad:
            where = f"prompt[{index}]" if len(prompts) > 1 else "prompt"
            raise RequestError(f"{where}: token ids must be in [0, {vocab_size}), got {bad[0]}", "prompt")
        out.append((None, list(prompt)))
    if any(not ids for _, ids in out):
        raise RequestError("prompt: a prompt has no tokens", "prompt")
    return out


def _message_text(index: int, content: Any) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    parts = []
    for part in content:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise RequestError(f"messages[{index}].content: only text parts are supported, got {part.get('type')!r}",
                               "messages")
        parts.append(part["text"])
    return "".join(parts)


def messages_text(body: ChatCompletionRequest) -> str:
    """All text of the messages (for the length check before the template runs)."""
    return "".join(_message_text(i, m.content) for i, m in enumerate(body.messages))


def chat_prompt(body: ChatCompletionRequest, tokenizer: Any, tools: list[dict] | None = None,
                add_generation_prompt: bool = True) -> list[int]:
    """Render the messages (and ``tools``) with the checkpoint's chat template, or the plain fallback.

    Fallback: one ``"<role>: <content>\\n"`` line per message, then ``"assistant: "``. A message's
    other fields (an assistant's ``tool_calls``, a tool's ``tool_call_id``) reach the template.
    """
    from deltaserve.server.structured import template_messages  # NOTE: that module imports this one

    if tokenizer is None:
        raise RequestError("messages: the checkpoint has no tokenizer, so chat is not available", "messages")
    messages = template_messages([
        {**m.model_dump(exclude_none=True), "role": m.role, "content": _message_text(i, m.content)}
        for i, m in enumerate(body.messages)
    ])
    if tools and not getattr(tokenizer, "chat_template", None):
        raise RequestError("tools: the checkpoint has no chat template to render tools with", "tools")
    if getattr(tokenizer, "chat_template", None):
        try:
            text = tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=add_generation_prompt,
                                                 tokenize=False)
        except Exception as exc:  # noqa: BLE001 - a template may reject e.g. two system messages
            raise RequestError(f"messages: the chat template refused them: {exc}", "messages") from exc
        # NOTE: the template writes its own special tokens (BOS); do not add them twice.
        return encode(tokenizer, text, add_special_tokens=False)
    text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + ("assistant: " if add_generation_prompt else "")
    return encode(tokenizer, text)


def check_refused(body: SamplingFields, scope: str) -> None:
    """400 naming the first field of ``REFUSED_FIELDS`` the body sets (see protocol.py)."""
    field = body.refused_field(scope)
    if field is not None:
        raise RequestError(f"{field}: not supported by deltaserve; leave it out (or at its default)", field,
                           code="unsupported_parameter")


def sampling_params(body: SamplingFields, max_tokens: int | None, num_prompt_tokens: int, max_model_len: int,
                    logprobs: int | None, prompt_field: str, prompt_logprobs: int | None = None) -> Any:
    """``SamplingParams`` for the engine; ``max_tokens=None`` means the rest of the context."""
    from deltaserve import SamplingParams

    room = max_model_len - num_prompt_tokens
    if room < 1:
        raise RequestError(f"{prompt_field}: the prompt has {num_prompt_tokens} tokens, the model's context is "
                           f"{max_model_len} tokens; at most {max_model_len - 1} prompt tokens fit", prompt_field,
                           code="context_length_exceeded")
    if max_tokens is None:
        max_tokens = room
    elif max_tokens > room:
        raise RequestError(f"max_tokens: {num_prompt_tokens} prompt tokens + max_tokens {max_tokens} exceed the "
                           f"model's context of {max_model_len} tokens; max_tokens must be at most {room}",
                           "max_tokens", code="context_length_exceeded")
    if body.min_tokens > max_tokens:
        raise RequestError(f"min_tokens: {body.min_tokens} exceeds max_tokens {max_tokens}", "min_tokens")
    kwargs = dict(n=body.n, temperature=body.temperature, top_p=body.top_p, min_p=body.min_p, seed=body.seed,
                  max_tokens=max_tokens, min_tokens=body.min_tokens, stop=body.stop_list(),
                  stop_token_ids=list(body.stop_token_ids or []), ignore_eos=body.ignore_eos,
                  repetition_penalty=body.repetition_penalty, presence_penalty=body.presence_penalty,
                  frequency_penalty=body.frequency_penalty, logit_bias=body.logit_bias_ids(), logprobs=logprobs,
                  prompt_logprobs=prompt_logprobs, include_stop_str_in_output=body.include_stop_str_in_output,
                  skip_special_tokens=body.skip_special_tokens)
    if body.top_k > 0:
        kwargs["top_k"] = body.top_k
    try:
        return SamplingParams(**kwargs)
    except ValueError as exc:
        raise RequestError(str(exc), guess_param(str(exc))) from exc


_FIELDS = ("max_tokens", "min_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "stop_token_ids", "stop",
           "ignore_eos", "repetition_penalty", "presence_penalty", "frequency_penalty", "logit_bias",
           "prompt_logprobs", "logprobs", "n", "prompt", "messages")


def guess_param(message: str) -> str | None:
    """The request field an engine ``ValueError`` names (its messages start with or quote the field)."""
    for name in _FIELDS:
        if message.startswith(name) or f"'{name}'" in message or f" {name} " in message:
            return name
    return None


def validation_error(errors: list[dict]) -> RequestError:
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
