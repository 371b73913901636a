"""Request fields of structured outputs and tool calling (mixed into the endpoints' bodies).

Names are OpenAI's (``response_format``, ``tools``, ``tool_choice``, ``parallel_tool_calls``) and
vLLM's (``structured_outputs``, and the older ``guided_json``, ``guided_regex``, ``guided_choice``,
``guided_grammar``; the ``openai`` client sends those through ``extra_body``).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel


class StructuredOutputFields(BaseModel):
    response_format: dict[str, Any] | None = None
    structured_outputs: dict[str, Any] | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None


class ToolFields(BaseModel):
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool = True
