"""Qwen / Hermes tool calls: ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`` blocks."""

from __future__ import annotations

import json
import re

from deltaserve.server.tool_parsers.base import MalformedToolCall, ToolCall, ToolParser, parse_arguments

_BLOCK = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)


class HermesToolParser(ToolParser):
    """vLLM's ``hermes`` format (Qwen2.5, Qwen3, Qwen3-Next and Hermes chat templates)."""

    name = "hermes"
    start_marker = "<tool_call>"
    structural_tag_model = "qwen_3"

    def parse_calls(self, calls_text: str, final: bool) -> list[ToolCall]:
        bodies = [match.group(1) for match in _BLOCK.finditer(calls_text)]
        tail = calls_text[calls_text.rfind("</tool_call>") + len("</tool_call>"):] if bodies else calls_text
        # NOTE: a model that stops (EOS) before the closing tag still made its call, as vLLM reads it.
        if final and self.start_marker in tail:
            bodies.append(tail[tail.find(self.start_marker) + len(self.start_marker):])
        return [_parse_block(body) for body in bodies]


def _parse_block(body: str) -> ToolCall:
    try:
        call = json.loads(body.strip())
    except json.JSONDecodeError as exc:
        raise MalformedToolCall(f"<tool_call> block is not JSON: {exc}") from None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str) or not call["name"]:
        raise MalformedToolCall("<tool_call> block must be an object with a non-empty string 'name'")
    arguments = call.get("arguments", call.get("parameters", {}))
    return ToolCall(call["name"], parse_arguments(arguments))
