"""The tool-call parser interface: a model's tool-call syntax back into OpenAI ``tool_calls``."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any, ClassVar


@dataclass
class ToolCall:
    """One call: ``arguments`` is JSON text, as OpenAI sends it."""

    name: str
    arguments: str
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def as_dict(self, index: int | None = None) -> dict:
        out = {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}
        return out if index is None else {"index": index, **out}


@dataclass
class ExtractedToolCalls:
    """``content``: the text before the calls (None when blank); ``tool_calls`` empty: plain text."""

    content: str | None
    tool_calls: list[ToolCall]


class MalformedToolCall(ValueError):
    """A tool-call block that does not parse; the whole output is then returned as content."""


class ToolParser:
    """One model family's tool-call format.

    Subclasses set ``name`` (vLLM's ``--tool-call-parser`` name), ``start_marker`` (where the calls
    begin), ``structural_tag_model`` (xgrammar's builtin structural tag of the same format, used to
    enforce ``tool_choice="required"`` and named functions) and implement ``parse_calls``.
    """

    name: ClassVar[str]
    start_marker: ClassVar[str]
    structural_tag_model: ClassVar[str]
    # NOTE: markers that are special tokens of the model's tokenizer must stay in the decoded text.
    needs_special_tokens: ClassVar[bool] = False

    def parse_calls(self, calls_text: str, final: bool) -> list[ToolCall]:
        """The complete calls in ``calls_text`` (the text from ``start_marker`` on), in order.

        ``final``: the output has ended (a block the model left unclosed may still count). Raises
        ``MalformedToolCall`` for a complete block that does not parse.
        """
        raise NotImplementedError

    def extract(self, text: str) -> ExtractedToolCalls:
        """The whole output: its calls and the content before them; malformed calls are plain content."""
        start = text.find(self.start_marker)
        if start == -1:
            return ExtractedToolCalls(text, [])
        try:
            calls = self.parse_calls(text[start:], final=True)
        except MalformedToolCall:
            calls = []
        if not calls:
            return ExtractedToolCalls(text, [])
        content = text[:start]
        return ExtractedToolCalls(content if content.strip() else None, calls)


def parse_arguments(raw: Any) -> str:
    """Arguments as compact JSON text: a JSON object (or its text); ``MalformedToolCall`` otherwise."""
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise MalformedToolCall(f"arguments are not JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise MalformedToolCall(f"arguments must be a JSON object, got {type(raw).__name__}")
    return json.dumps(raw, ensure_ascii=False)
