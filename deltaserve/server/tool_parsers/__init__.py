"""Tool-call parsers, one module per format, chosen per model by vLLM's ``tool_call_parser`` name."""

from __future__ import annotations

from deltaserve.server.tool_parsers.base import ExtractedToolCalls, MalformedToolCall, ToolCall, ToolParser
from deltaserve.server.tool_parsers.hermes import HermesToolParser
from deltaserve.server.tool_parsers.kimi_k2 import KimiK2ToolParser

TOOL_PARSERS: dict[str, type[ToolParser]] = {cls.name: cls for cls in (HermesToolParser, KimiK2ToolParser)}
# NOTE: by architecture when the chat template does not show the format.
_ARCHITECTURE_DEFAULTS = {"KimiLinearForCausalLM": "kimi_k2", "Qwen3NextForCausalLM": "hermes",
                          "Qwen3_5ForCausalLM": "hermes", "Qwen3_5MoeForCausalLM": "hermes"}


def get_tool_parser(name: str) -> ToolParser:
    """The parser named ``name``; ValueError listing the known names."""
    if name not in TOOL_PARSERS:
        raise ValueError(f"tool_call_parser: unknown parser {name!r}; known: {', '.join(sorted(TOOL_PARSERS))}")
    return TOOL_PARSERS[name]()


def default_tool_parser_name(architectures: list[str] | None, chat_template: str | None) -> str:
    """The format the chat template writes (its markers), else the architecture's, else ``hermes``."""
    template = chat_template or ""
    if KimiK2ToolParser.start_marker in template or "<|tool_call_begin|>" in template:
        return KimiK2ToolParser.name
    if HermesToolParser.start_marker in template:
        return HermesToolParser.name
    for architecture in architectures or []:
        if architecture in _ARCHITECTURE_DEFAULTS:
            return _ARCHITECTURE_DEFAULTS[architecture]
    return HermesToolParser.name


__all__ = ["ExtractedToolCalls", "MalformedToolCall", "TOOL_PARSERS", "ToolCall", "ToolParser",
           "default_tool_parser_name", "get_tool_parser"]
