"""Structured outputs and tool calling on the server: request fields to ``StructuredOutputsParams``.

``response_format``, ``structured_outputs`` and vLLM's ``guided_*`` fields each name one constraint;
at most one may be set. On chat, ``tools`` with ``tool_choice="required"`` or a named function add a
structural-tag grammar of the model's tool-call format (xgrammar's builtin tags), so that the call's
arguments are valid JSON for the function's schema; ``"auto"`` leaves the output free and parses it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from deltaserve.server.serving import RequestError
from deltaserve.server.structured_fields import StructuredOutputFields, ToolFields
from deltaserve.server.tool_parsers import ToolParser
from deltaserve.structured import StructuredOutputsParams

_GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}


Constraint = tuple[str, StructuredOutputsParams]  # (the request field that set it, the constraint)


def structured_outputs_of(body: StructuredOutputFields) -> Constraint | None:
    """The one constraint the body asks for and its field, or None; ``RequestError`` naming the field."""
    found: list[tuple[str, dict]] = []
    for field, kind in _GUIDED.items():
        value = getattr(body, field)
        if value is not None:
            found.append((field, {kind: value}))
    if body.structured_outputs is not None:
        found.append(("structured_outputs", dict(body.structured_outputs)))
    if body.response_format is not None:
        spec = _response_format(body.response_format)
        if spec is not None:
            found.append(("response_format", spec))
    if not found:
        return None
    if len(found) > 1:
        names = ", ".join(name for name, _ in found)
        raise RequestError(f"{found[1][0]}: only one structured output constraint per request, got {names}",
                           found[1][0])
    field, spec = found[0]
    try:
        return field, StructuredOutputsParams(**spec)
    except (TypeError, ValueError) as exc:
        raise RequestError(f"{field}: {exc}", field) from None


async def constrain(engine: Any, params: Any, constraint: Constraint | None, plan: "ToolPlan | None" = None) -> Any:
    """``params`` with the constraint, its grammar compiled in a worker thread (so the engine's
    ``add_request`` finds it cached); a grammar that does not compile is a 400 naming the field.

    With a ``plan`` whose calls are parsed in a format of special tokens, those stay in the text.
    """
    if plan is not None and plan.parse and plan.parser.needs_special_tokens:
        params = dataclasses.replace(params, skip_special_tokens=False)
    if constraint is None:
        return params
    field, structured = constraint
    try:
        await asyncio.to_thread(engine.compile_grammar, structured)
    except ValueError as exc:
        raise RequestError(f"{field}: {exc}", field) from None
    return dataclasses.replace(params, structured_outputs=structured)


def _response_format(value: dict) -> dict | None:
    kind = value.get("type")
    if kind in (None, "text"):
        return None
    if kind == "json_object":
        return {"json_object": True}
    if kind == "json_schema":
        spec = value.get("json_schema")
        schema = spec.get("schema", spec.get("json_schema")) if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise RequestError("response_format.json_schema.schema: a JSON schema object is required",
                               "response_format")
        return {"json": schema}
    raise RequestError(f"response_format.type: must be 'text', 'json_object' or 'json_schema', got {kind!r}",
                       "response_format")


@dataclass
class ToolPlan:
    """How one chat request uses its tools.

    ``tools``: what the chat template renders (None: no tools); ``parse``: read tool calls back from
    the output; ``grammar``: the constraint forcing a call (``required`` / a named function).
    """

    tools: list[dict] | None
    parse: bool
    grammar: StructuredOutputsParams | None
    parser: ToolParser


def chat_constraint(body: StructuredOutputFields, plan: ToolPlan) -> Constraint | None:
    """The chat request's one constraint: its structured output, or the forced tool call's grammar."""
    constraint = structured_outputs_of(body)
    if plan.grammar is None:
        return constraint
    if constraint is not None:
        raise RequestError(f"{constraint[0]}: cannot be combined with a forced tool call (tool_choice)", constraint[0])
    return "tool_choice", plan.grammar


def tool_plan(body: ToolFields, parser: ToolParser) -> ToolPlan:
    """Check ``tools`` and ``tool_choice``; ``RequestError`` naming the field on a bad one."""
    tools = body.tools or None
    choice = body.tool_choice if body.tool_choice is not None else ("auto" if tools else "none")
    names = [_tool_name(i, tool) for i, tool in enumerate(tools or [])]
    if isinstance(choice, dict):
        function = choice.get("function") if choice.get("type") == "function" else None
        name = function.get("name") if isinstance(function, dict) else None
        if not isinstance(name, str):
            raise RequestError("tool_choice: a named choice is {'type': 'function', 'function': {'name': ...}}",
                               "tool_choice")
        if name not in names:
            raise RequestError(f"tool_choice: function {name!r} is not in tools ({', '.join(names) or 'none'})",
                               "tool_choice")
    elif choice not in ("none", "auto", "required"):
        raise RequestError(f"tool_choice: must be 'none', 'auto', 'required' or a named function, got {choice!r}",
                           "tool_choice")
    elif choice != "none" and not tools:
        raise RequestError(f"tool_choice: {choice!r} needs a non-empty tools list", "tool_choice")
    if choice == "none" or not tools:
        return ToolPlan(tools, False, None, parser)
    if choice == "auto":
        return ToolPlan(tools, True, None, parser)
    return ToolPlan(tools, True, _tool_grammar(tools, choice, parser, body.parallel_tool_calls), parser)


def _tool_name(index: int, tool: Any) -> str:
    function = tool.get("function") if isinstance(tool, dict) and tool.get("type", "function") == "function" else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
        raise RequestError(f"tools[{index}]: must be {{'type': 'function', 'function': {{'name': ..., "
                           f"'parameters': {{...}}}}}}", "tools")
    parameters = function.get("parameters")
    if parameters is not None and not isinstance(parameters, dict):
        raise RequestError(f"tools[{index}].function.parameters: must be a JSON schema object", "tools")
    return function["name"]


def _tool_grammar(tools: list[dict], choice: str | dict, parser: ToolParser,
                  parallel: bool) -> StructuredOutputsParams:
    import xgrammar as xgr

    try:
        tag = xgr.get_model_structural_tag(parser.structural_tag_model, tools=tools, tool_choice=choice,
                                           reasoning="disabled", parallel_tool_calls=parallel)
    except (ValueError, TypeError) as exc:
        raise RequestError(f"tools: {exc}", "tools") from None
    return StructuredOutputsParams(structural_tag=tag.model_dump_json())


def template_messages(messages: list[dict]) -> list[dict]:
    """Messages as chat templates expect them: an assistant's tool-call ``arguments`` as a dict.

    NOTE: OpenAI sends arguments as JSON text; Qwen's and Kimi's templates serialise a mapping
    themselves (vLLM converts them the same way). Text that is not JSON is left as it is.
    """
    out = []
    for message in messages:
        calls = message.get("tool_calls")
        if isinstance(calls, list):
            message = dict(message, tool_calls=[_with_dict_arguments(call) for call in calls])
        out.append(message)
    return out


def _with_dict_arguments(call: Any) -> Any:
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("arguments"), str):
        return call
    try:
        arguments = json.loads(function["arguments"])
    except json.JSONDecodeError:
        return call
    return dict(call, function=dict(function, arguments=arguments))
