"""From the engine's cumulative ``RequestOutput`` to OpenAI response bodies and stream chunks.

The engine's text is already safe to show while a sequence runs (it holds back a tail that could
still become a stop string, and incomplete UTF-8), so a stream sends what grew since the last chunk.
"""

from __future__ import annotations

import json
import math
from typing import Any

from deltaserve.server.protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprobs,
    ChatResponseMessage,
    ChatTokenLogprob,
    CompletionChoice,
    CompletionLogprobs,
    CompletionResponse,
    TopLogprob,
    PromptTokensDetails,
    UsageInfo,
)
from deltaserve.server.tool_parsers import ToolParser
from deltaserve.server.tool_parsers.stream import ToolCallStream


def sse(payload: dict | str) -> str:
    """One server-sent event: ``data: <json>`` and a blank line."""
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    return f"data: {data}\n\n"


def usage_of(output: Any) -> UsageInfo:
    prompt = len(output.prompt_token_ids)
    completion = sum(len(c.token_ids) for c in output.outputs)
    return UsageInfo(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                     prompt_tokens_details=PromptTokensDetails(cached_tokens=output.num_cached_tokens))


def _finite(logprob: float | None) -> float:
    # NOTE: top-k / top-p mask tokens to -inf, which JSON cannot carry; OpenAI writes -9999.0 there.
    return logprob if logprob is not None and math.isfinite(logprob) else -9999.0


def _token_text(token_id: int, logprob: Any, tokenizer: Any) -> str:
    if logprob is not None and logprob.decoded_token is not None:
        return logprob.decoded_token
    # NOTE: vLLM's spelling for a token that cannot be decoded (no tokenizer).
    return tokenizer.decode([token_id]) if tokenizer is not None else f"token_id:{token_id}"


def _token_entries(
    completion: Any, start: int, tokenizer: Any, top: int
) -> list[tuple[str, float, list[tuple[str, float]]]]:
    """``(token, logprob, [(alternative, logprob)] best first)`` for tokens ``start..`` of a sequence."""
    entries = []
    for token_id, candidates in zip(completion.token_ids[start:], (completion.logprobs or [])[start:]):
        chosen = candidates.get(token_id)
        alternatives = sorted(candidates.items(), key=lambda item: item[1].rank)[:top]
        entries.append((
            _token_text(token_id, chosen, tokenizer),
            _finite(chosen.logprob if chosen is not None else None),
            [(_token_text(tid, lp, tokenizer), _finite(lp.logprob)) for tid, lp in alternatives],
        ))
    return entries


class ResponseBuilder:
    """Builds one request's bodies; remembers, per choice, how much text and how many tokens were sent.

    ``logprobs``: completions' int (top-k), or chat's ``top_logprobs`` when chat ``logprobs`` is true.
    ``tool_parser``: chat outputs are read for tool calls (``message.tool_calls``, ``delta.tool_calls``,
    ``finish_reason: "tool_calls"``); an output whose calls do not parse stays plain content.
    """

    def __init__(self, request_id: str, model: str, chat: bool, logprobs: int | None, tokenizer: Any,
                 tool_parser: ToolParser | None = None):
        self.request_id, self.model, self.chat = request_id, model, chat
        self.logprobs, self.tokenizer = logprobs, tokenizer
        self.tool_parser = tool_parser
        self.tool_streams: dict[int, ToolCallStream] = {}
        self.sent_chars: dict[int, int] = {}
        self.sent_tokens: dict[int, int] = {}
        self.finished: set[int] = set()

    # ---- logprobs in each endpoint's shape -------------------------------------------------------

    def _completion_logprobs(self, completion: Any, start: int, text_offset: int) -> CompletionLogprobs | None:
        if self.logprobs is None or completion.logprobs is None:
            return None
        result = CompletionLogprobs()
        for token, logprob, alternatives in _token_entries(completion, start, self.tokenizer, self.logprobs):
            result.tokens.append(token)
            result.token_logprobs.append(logprob)
            result.top_logprobs.append(dict(alternatives))
            result.text_offset.append(text_offset)
            text_offset += len(token)
        return result

    def _chat_logprobs(self, completion: Any, start: int) -> ChatLogprobs | None:
        if self.logprobs is None or completion.logprobs is None:
            return None
        content = []
        for token, logprob, alternatives in _token_entries(completion, start, self.tokenizer, self.logprobs):
            content.append(ChatTokenLogprob(
                token=token, logprob=logprob, bytes=list(token.encode()),
                top_logprobs=[TopLogprob(token=t, logprob=lp, bytes=list(t.encode())) for t, lp in alternatives],
            ))
        return ChatLogprobs(content=content)

    # ---- whole responses -------------------------------------------------------------------------

    def response(self, output: Any) -> dict:
        """The non-streaming body from the final output."""
        usage = usage_of(output)
        if self.chat:
            choices = [ChatChoice(index=c.index, message=message, logprobs=self._chat_logprobs(c, 0),
                                  finish_reason=finish_reason)
                       for c in output.outputs for message, finish_reason in [self._chat_message(c)]]
            body = ChatCompletionResponse(id=self.request_id, model=self.model, choices=choices, usage=usage)
            return body.model_dump()
        choices = [CompletionChoice(index=c.index, text=c.text, logprobs=self._completion_logprobs(c, 0, 0),
                                    finish_reason=c.finish_reason)
                   for c in output.outputs]
        return CompletionResponse(id=self.request_id, model=self.model, choices=choices, usage=usage).model_dump()

    def _chat_message(self, completion: Any) -> tuple[ChatResponseMessage, str | None]:
        if self.tool_parser is None:
            return ChatResponseMessage(content=completion.text), completion.finish_reason
        extracted = self.tool_parser.extract(completion.text)
        if not extracted.tool_calls:
            return ChatResponseMessage(content=completion.text), completion.finish_reason
        message = ChatResponseMessage(content=extracted.content, tool_calls=[t.as_dict() for t in extracted.tool_calls])
        return message, _tool_finish_reason(completion.finish_reason)

    def _tool_delta(self, completion: Any) -> tuple[str, list[dict], str | None]:
        """This choice's new content and complete tool calls, and its finish reason."""
        stream = self.tool_streams.setdefault(completion.index, ToolCallStream(self.tool_parser))
        finish_reason = completion.finish_reason
        delta, calls = stream.update(completion.text, final=finish_reason is not None)
        return delta, calls, _tool_finish_reason(finish_reason) if stream.num_calls else finish_reason

    # ---- streams ---------------------------------------------------------------------------------

    def first_chunks(self, n: int) -> list[str]:
        """Chat streams open each choice with the assistant role, as OpenAI does."""
        if not self.chat:
            return []
        return [sse(ChatCompletionChunk(id=self.request_id, model=self.model, choices=[
            ChatChunkChoice(index=i, delta=ChatDelta(role="assistant", content=""))]).model_dump())
            for i in range(n)]

    def chunks(self, output: Any) -> list[str]:
        """Events for what grew since the last call: one per choice with new text, tokens or an end."""
        events = []
        for c in output.outputs:
            if c.index in self.finished:
                continue
            chars, tokens = self.sent_chars.get(c.index, 0), self.sent_tokens.get(c.index, 0)
            delta = c.text[chars:]
            finish_reason = c.finish_reason
            tool_calls: list[dict] = []
            if self.chat and self.tool_parser is not None:
                delta, tool_calls, finish_reason = self._tool_delta(c)
            new_logprobs = self.logprobs is not None and len(c.token_ids) > tokens
            if not delta and not tool_calls and not new_logprobs and finish_reason is None:
                continue
            if self.chat:
                # NOTE: the closing chunk of a choice has an empty delta, as OpenAI sends it.
                chat_delta = ChatDelta(content=delta) if delta or finish_reason is None else ChatDelta()
                if tool_calls:
                    chat_delta = ChatDelta(content=delta or None, tool_calls=tool_calls)
                choice = ChatChunkChoice(index=c.index, delta=chat_delta, logprobs=self._chat_logprobs(c, tokens),
                                         finish_reason=finish_reason)
                body = ChatCompletionChunk(id=self.request_id, model=self.model, choices=[choice])
            else:
                logprobs = self._completion_logprobs(c, tokens, chars)
                choice = CompletionChoice(index=c.index, text=delta, logprobs=logprobs,
                                          finish_reason=finish_reason)
                body = CompletionResponse(id=self.request_id, model=self.model, choices=[choice])
            events.append(sse(body.model_dump(exclude={"usage"})))
            self.sent_chars[c.index], self.sent_tokens[c.index] = len(c.text), len(c.token_ids)
            if finish_reason is not None:
                self.finished.add(c.index)
        return events

    def usage_chunk(self, output: Any) -> str:
        """The last chunk with ``stream_options.include_usage``: no choices, the request's usage."""
        cls = ChatCompletionChunk if self.chat else CompletionResponse
        return sse(cls(id=self.request_id, model=self.model, choices=[], usage=usage_of(output)).model_dump())


def _tool_finish_reason(finish_reason: str | None) -> str | None:
    # NOTE: an output that ended normally after its calls ends with "tool_calls", as OpenAI's does.
    return "tool_calls" if finish_reason == "stop" else finish_reason
