"""From the engine's cumulative ``RequestOutput`` to OpenAI response bodies and stream chunks.

The engine's text is already safe to show while a sequence runs (it holds back a tail that could
still become a stop string, and incomplete UTF-8), so a stream sends what grew since the last chunk.
"""

from __future__ import annotations

import json
from typing import Any

from deltaserve.server.logprobs import EchoPrompt, distinct_top_logprobs, token_entry, prompt_logprobs_body
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


def usage_of(outputs: list[Any]) -> UsageInfo:
    """Usage summed over a request's prompts (each an engine request's final output)."""
    prompt = sum(len(output.prompt_token_ids) for output in outputs)
    completion = sum(len(c.token_ids) for output in outputs for c in output.outputs)
    cached = sum(output.num_cached_tokens for output in outputs)
    return UsageInfo(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                     prompt_tokens_details=PromptTokensDetails(cached_tokens=cached))


class ResponseBuilder:
    """Builds one request's bodies over its prompts (choice ``index = prompt_index * n + i``, as OpenAI
    numbers them); remembers, per choice, how much text and how many tokens were sent.

    ``logprobs``: completions' int (top-k), or chat's ``top_logprobs`` when chat ``logprobs`` is true.
    ``echo``: per prompt, the ``EchoPrompt`` to put before its choices (completions only).
    ``tool_parser``: chat outputs are read for tool calls (``message.tool_calls``, ``delta.tool_calls``,
    ``finish_reason: "tool_calls"``); an output whose calls do not parse stays plain content.
    """

    def __init__(self, request_id: str, model: str, chat: bool, logprobs: int | None, tokenizer: Any, n: int = 1,
                 echo: list[EchoPrompt] | None = None, with_prompt_logprobs: bool = False,
                 tool_parser: ToolParser | None = None):
        self.request_id, self.model, self.chat = request_id, model, chat
        self.logprobs, self.tokenizer, self.n, self.echo = logprobs, tokenizer, n, echo
        self.with_prompt_logprobs = with_prompt_logprobs
        self.tool_parser = tool_parser
        self.tool_streams: dict[int, ToolCallStream] = {}
        self.sent_chars: dict[int, int] = {}
        self.sent_tokens: dict[int, int] = {}
        self.finished: set[int] = set()

    # ---- logprobs in each endpoint's shape -------------------------------------------------------

    def _completion_logprobs(self, completion: Any, start: int, end: int, shift: int) -> CompletionLogprobs | None:
        """Tokens ``start..end`` of a choice; ``shift``: characters before its text (an echoed prompt)."""
        if self.logprobs is None or completion.logprobs is None:
            return None
        result = CompletionLogprobs()
        offsets = completion.text_offsets or [len(completion.text)] * len(completion.token_ids)
        for i in range(start, end):
            token_id = completion.token_ids[i]
            text, logprob, alternatives = token_entry(token_id, completion.logprobs[i], self.tokenizer, self.logprobs)
            result.tokens.append(text)
            result.token_logprobs.append(logprob)
            # NOTE: vLLM's rule: the sampled token is always there, so logprobs=0 returns it alone.
            result.top_logprobs.append(distinct_top_logprobs(alternatives + [(token_id, text, logprob)]))
            result.text_offset.append(shift + offsets[i])
        return result

    def _chat_logprobs(self, completion: Any, start: int, end: int) -> ChatLogprobs | None:
        if self.logprobs is None or completion.logprobs is None:
            return None
        content = []
        for i in range(start, end):
            text, logprob, alternatives = token_entry(completion.token_ids[i], completion.logprobs[i], self.tokenizer,
                                                 self.logprobs)
            content.append(ChatTokenLogprob(
                token=text, logprob=logprob, bytes=list(text.encode()),
                top_logprobs=[TopLogprob(token=t, logprob=lp, bytes=list(t.encode())) for _, t, lp in alternatives],
            ))
        return ChatLogprobs(content=content)

    def _echoed(self, prompt_index: int, output: Any, text: str, logprobs: CompletionLogprobs | None):
        """The echoed prompt put before a choice's first text and logprobs."""
        echo = self.echo[prompt_index]
        if logprobs is not None:
            head = echo.logprobs(output, self.tokenizer, self.logprobs)
            for name in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
                setattr(logprobs, name, getattr(head, name) + getattr(logprobs, name))
        return echo.text + text, logprobs

    # ---- whole responses -------------------------------------------------------------------------

    def response(self, outputs: list[Any]) -> dict:
        """The non-streaming body from each prompt's final output."""
        usage = usage_of(outputs)
        if self.chat:
            choices = [ChatChoice(index=c.index, message=message, logprobs=self._chat_logprobs(c, 0, len(c.token_ids)),
                                  finish_reason=finish_reason)
                       for c in outputs[0].outputs for message, finish_reason in [self._chat_message(c)]]
            body = ChatCompletionResponse(id=self.request_id, model=self.model, choices=choices, usage=usage)
            return body.model_dump()
        choices = []
        for prompt_index, output in enumerate(outputs):
            for c in output.outputs:
                shift = len(self.echo[prompt_index].text) if self.echo else 0
                text, logprobs = c.text, self._completion_logprobs(c, 0, len(c.token_ids), shift)
                if self.echo:
                    text, logprobs = self._echoed(prompt_index, output, text, logprobs)
                choices.append(CompletionChoice(
                    index=prompt_index * self.n + c.index, text=text, logprobs=logprobs, finish_reason=c.finish_reason,
                    prompt_logprobs=prompt_logprobs_body(output) if self.with_prompt_logprobs else None))
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

    def chunks(self, output: Any, prompt_index: int = 0) -> list[str]:
        """Events for what grew since the last call: one per choice with new text, tokens or an end.

        NOTE: a token whose text has not been shown yet (an incomplete character, or text held back
        as a possible stop string) waits for the chunk that shows it, so that every ``text_offset``
        lies inside the text sent so far and equals the one of the non-streamed answer.
        """
        events = []
        for c in output.outputs:
            index = prompt_index * self.n + c.index
            if index in self.finished:
                continue
            chars, tokens = self.sent_chars.get(index, 0), self.sent_tokens.get(index, 0)
            delta = c.text[chars:]
            finish_reason = c.finish_reason
            end = len(c.token_ids)
            if finish_reason is None and c.text_offsets is not None:
                while end > tokens and c.text_offsets[end - 1] >= len(c.text):
                    end -= 1
            tool_calls: list[dict] = []
            if self.chat and self.tool_parser is not None:
                delta, tool_calls, finish_reason = self._tool_delta(c)
            new_logprobs = self.logprobs is not None and end > tokens
            first = index not in self.sent_chars
            if (not delta and not tool_calls and not new_logprobs and finish_reason is None
                    and not (first and self.echo)):
                continue
            if self.chat:
                # NOTE: the closing chunk of a choice has an empty delta, as OpenAI sends it.
                chat_delta = ChatDelta(content=delta) if delta or finish_reason is None else ChatDelta()
                if tool_calls:
                    chat_delta = ChatDelta(content=delta or None, tool_calls=tool_calls)
                choice = ChatChunkChoice(index=index, delta=chat_delta, logprobs=self._chat_logprobs(c, tokens, end),
                                         finish_reason=finish_reason)
                body = ChatCompletionChunk(id=self.request_id, model=self.model, choices=[choice])
            else:
                shift = len(self.echo[prompt_index].text) if self.echo else 0
                logprobs = self._completion_logprobs(c, tokens, end, shift)
                if first and self.echo:
                    delta, logprobs = self._echoed(prompt_index, output, delta, logprobs)
                choice = CompletionChoice(index=index, text=delta, logprobs=logprobs, finish_reason=finish_reason,
                                          prompt_logprobs=prompt_logprobs_body(output)
                                          if first and self.with_prompt_logprobs else None)
                body = CompletionResponse(id=self.request_id, model=self.model, choices=[choice])
            events.append(sse(body.model_dump(exclude={"usage"})))
            self.sent_chars[index], self.sent_tokens[index] = len(c.text), end
            if finish_reason is not None:
                self.finished.add(index)
        return events

    def usage_chunk(self, outputs: list[Any]) -> str:
        """The last chunk with ``stream_options.include_usage``: no choices, the request's usage."""
        cls = ChatCompletionChunk if self.chat else CompletionResponse
        return sse(cls(id=self.request_id, model=self.model, choices=[], usage=usage_of(outputs)).model_dump())


def _tool_finish_reason(finish_reason: str | None) -> str | None:
    # NOTE: an output that ended normally after its calls ends with "tool_calls", as OpenAI's does.
    return "tool_calls" if finish_reason == "stop" else finish_reason
