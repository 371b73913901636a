"""Kimi tool calls: ``<|tool_calls_section_begin|>`` then, per call,
``<|tool_call_begin|>functions.NAME:IDX<|tool_call_argument_begin|>{json}<|tool_call_end|>``, then
``<|tool_calls_section_end|>`` (Kimi-K2's and Kimi-Linear's chat templates)."""

from __future__ import annotations

import re

from deltaserve.server.tool_parsers.base import MalformedToolCall, ToolCall, ToolParser, parse_arguments

_CALL = re.compile(
    r"<\|tool_call_begin\|>\s*(?P<id>[^<]*?)\s*<\|tool_call_argument_begin\|>\s*(?P<args>.*?)\s*<\|tool_call_end\|>",
    re.DOTALL,
)
_CALL_ID = re.compile(r"^(?:functions\.)?(?P<name>[^\s:]+):(?P<index>\d+)$")


class KimiK2ToolParser(ToolParser):
    """vLLM's ``kimi_k2`` format; the call id is Kimi's own ``functions.NAME:IDX``, as vLLM returns it."""

    name = "kimi_k2"
    start_marker = "<|tool_calls_section_begin|>"
    structural_tag_model = "kimi"
    needs_special_tokens = True

    def parse_calls(self, calls_text: str, final: bool) -> list[ToolCall]:
        calls = []
        for match in _CALL.finditer(calls_text):
            call_id = _CALL_ID.match(match.group("id"))
            if call_id is None:
                raise MalformedToolCall(f"tool call id {match.group('id')!r} is not 'functions.NAME:INDEX'")
            calls.append(ToolCall(call_id.group("name"), parse_arguments(match.group("args")), id=match.group("id")))
        return calls
