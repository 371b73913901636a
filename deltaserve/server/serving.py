"""From an HTTP request body to the engine's inputs: prompt token ids and ``SamplingParams``.

Every refusal is a ``RequestError`` naming the field (``param``) and the allowed range, answered
with OpenAI's error shape by the app.
"""

from __future__ import annotations

from typing import Any

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


def completion_prompt(body: CompletionRequest, tokenizer: Any, vocab_size: int) -> list[int]:
    """The prompt's token ids: text is tokenized as ``LLM.generate`` does; ids are range-checked."""
    prompt = body.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        if len(prompt) != 1:
            raise RequestError(f"prompt: one prompt per request is supported, got a list of {len(prompt)}", "prompt")
        prompt = prompt[0]
    if isinstance(prompt, str):
        return encode(tokenizer, prompt)
    bad = [t for t in prompt if not 0 <= t < vocab_size]
    if bad:
        raise RequestError(f"prompt: token ids must be in [0, {vocab_size}), got {bad[0]}", "prompt")
    return list(prompt)


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


def chat_prompt(body: ChatCompletionRequest, tokenizer: Any, tools: list[dict] | None = None) -> list[int]:
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
            text = tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=False)
        except Exception as exc:  # noqa: BLE001 - a template may reject e.g. two system messages
            raise RequestError(f"messages: the chat template refused them: {exc}", "messages") from exc
        # NOTE: the template writes its own special tokens (BOS); do not add them twice.
        return encode(tokenizer, text, add_special_tokens=False)
    text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "
    return encode(tokenizer, text)


def sampling_params(body: SamplingFields, max_tokens: int | None, num_prompt_tokens: int, max_model_len: int,
                    logprobs: int | None, prompt_field: str) -> Any:
    """``SamplingParams`` for the engine; ``max_tokens=None`` means the rest of the context."""
    from deltaserve import SamplingParams

    field = body.unsupported_field()
    if field is not None:
        raise RequestError(f"{field}: not supported by deltaserve; leave it at its default", field,
                           code="unsupported_parameter")

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
    stop = body.stop_list()
    if any(not s for s in stop):
        raise RequestError("stop: stop strings must not be empty", "stop")
    kwargs = dict(n=body.n, temperature=body.temperature, top_p=body.top_p, seed=body.seed, max_tokens=max_tokens,
                  stop=stop, stop_token_ids=list(body.stop_token_ids or []), ignore_eos=body.ignore_eos,
                  logprobs=logprobs)
    if body.top_k > 0:
        kwargs["top_k"] = body.top_k
    try:
        return SamplingParams(**kwargs)
    except ValueError as exc:
        raise RequestError(str(exc), guess_param(str(exc))) from exc


_FIELDS = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop_token_ids", "stop", "ignore_eos",
           "logprobs", "n", "prompt", "messages")


def guess_param(message: str) -> str | None:
    """The request field an engine ``ValueError`` names (its messages start with or quote the field)."""
    for name in _FIELDS:
        if message.startswith(name) or f"'{name}'" in message or f" {name} " in message:
            return name
    return None
