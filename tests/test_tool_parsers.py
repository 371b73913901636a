"""Tool-call parsers against hand-written model outputs of each format, malformed ones included.

The streamed reading (``ToolCallStream``, fed the text a few characters at a time) must add up to
the same content and calls as the whole-output reading.
"""

from __future__ import annotations

import json

import pytest

from deltaserve.server.tool_parsers import default_tool_parser_name, get_tool_parser
from deltaserve.server.tool_parsers.stream import ToolCallStream

HERMES_OK = [
    # (model output, expected content, expected [(name, arguments)])
    ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}\n</tool_call>',
     None, [("get_weather", {"city": "Paris", "days": 2})]),
    ('Let me check.\n<tool_call>\n{"name": "a", "arguments": {}}\n</tool_call>\n<tool_call>\n'
     '{"name": "b", "arguments": {"x": [1, "é"]}}\n</tool_call>',
     "Let me check.\n", [("a", {}), ("b", {"x": [1, "é"]})]),
    # stopped (EOS) before the closing tag: still a call, as vLLM reads it
    ('<tool_call>\n{"name": "f", "arguments": {"q": "<tool_call>"}}\n', None, [("f", {"q": "<tool_call>"})]),
    # arguments given as a JSON string
    ('<tool_call>{"name": "f", "arguments": "{\\"k\\": 1}"}</tool_call>', None, [("f", {"k": 1})]),
]
HERMES_MALFORMED = [
    "no call here at all",
    '<tool_call>\n{"name": "f", "arguments": {"city": "Par\n</tool_call>',  # truncated JSON
    '<tool_call>\n{"arguments": {}}\n</tool_call>',  # no name
    '<tool_call>\n["f", {}]\n</tool_call>',  # not an object
    '<tool_call>\n{"name": "f", "arguments": [1, 2]}\n</tool_call>',  # arguments not an object
    "<tool_call>",
]
KIMI_OK = [
    ("<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>"
     '{"city": "Beijing"}<|tool_call_end|><|tool_calls_section_end|>',
     None, [("get_weather", {"city": "Beijing"}, "functions.get_weather:0")]),
    ("I will call two tools.<|tool_calls_section_begin|>\n<|tool_call_begin|> functions.search:0 "
     '<|tool_call_argument_begin|> {"q": "kda"} <|tool_call_end|>\n<|tool_call_begin|>functions.read_file:1'
     '<|tool_call_argument_begin|>{"path": "/a", "lines": [1, 2]}<|tool_call_end|>\n<|tool_calls_section_end|>',
     "I will call two tools.", [("search", {"q": "kda"}, "functions.search:0"),
                                ("read_file", {"path": "/a", "lines": [1, 2]}, "functions.read_file:1")]),
]
KIMI_MALFORMED = [
    "plain answer",
    "<|tool_calls_section_begin|><|tool_call_begin|>functions.f:0<|tool_call_argument_begin|>{\"a\": <|tool_call_end|>"
    "<|tool_calls_section_end|>",  # arguments not JSON
    "<|tool_calls_section_begin|><|tool_call_begin|>functions.f<|tool_call_argument_begin|>{}<|tool_call_end|>"
    "<|tool_calls_section_end|>",  # id without an index
    "<|tool_calls_section_begin|><|tool_call_begin|>functions.f:0<|tool_call_argument_begin|>{\"a\": 1}",  # cut off
]


def _calls(extracted):
    return [(c.name, json.loads(c.arguments)) for c in extracted.tool_calls]


def _streamed(parser, text: str, step: int = 3):
    stream = ToolCallStream(parser)
    content, calls = "", []
    for end in list(range(step, len(text), step)) + [len(text)]:
        delta, entries = stream.update(text[:end], final=end == len(text))
        content += delta
        calls += entries
    return content, calls


@pytest.mark.parametrize("text, content, calls", HERMES_OK)
def test_hermes_calls(text, content, calls):
    parser = get_tool_parser("hermes")
    extracted = parser.extract(text)
    assert extracted.content == content and _calls(extracted) == calls
    assert all(c.id.startswith("call_") for c in extracted.tool_calls)
    streamed_content, entries = _streamed(parser, text)
    assert streamed_content == (content or "")
    assert [(e["function"]["name"], json.loads(e["function"]["arguments"])) for e in entries] == calls
    assert [e["index"] for e in entries] == list(range(len(calls)))


@pytest.mark.parametrize("text, content, calls", KIMI_OK)
def test_kimi_calls(text, content, calls):
    parser = get_tool_parser("kimi_k2")
    extracted = parser.extract(text)
    assert extracted.content == content
    assert [(c.name, json.loads(c.arguments), c.id) for c in extracted.tool_calls] == calls
    streamed_content, entries = _streamed(parser, text, step=5)
    assert streamed_content == (content or "")
    assert [(e["function"]["name"], e["id"]) for e in entries] == [(n, i) for n, _, i in calls]


@pytest.mark.parametrize("name, text", [("hermes", t) for t in HERMES_MALFORMED] + [("kimi_k2", t) for t in KIMI_MALFORMED])
def test_malformed_output_is_plain_content(name, text):
    parser = get_tool_parser(name)
    extracted = parser.extract(text)
    assert extracted.tool_calls == [] and extracted.content == text
    content, entries = _streamed(parser, text)
    assert entries == [] and content == text


def test_a_malformed_block_after_a_good_one():
    """Whole: plain content (as vLLM answers). Streamed: the good call was already sent; the bad one is dropped."""
    parser = get_tool_parser("hermes")
    text = '<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call><tool_call>{"name": oops}</tool_call>'
    extracted = parser.extract(text)
    assert extracted.tool_calls == [] and extracted.content == text
    content, entries = _streamed(parser, text)
    assert content == "" and [e["function"]["name"] for e in entries] == ["f"]


def test_stream_holds_back_only_a_possible_marker():
    stream = ToolCallStream(get_tool_parser("hermes"))
    assert stream.update("Hello <tool", final=False) == ("Hello ", [])
    assert stream.update("Hello <toolbox", final=False) == ("<toolbox", [])


def test_parser_names_and_defaults():
    with pytest.raises(ValueError, match="hermes.*kimi_k2"):
        get_tool_parser("mistral")
    assert default_tool_parser_name(["KimiLinearForCausalLM"], None) == "kimi_k2"
    assert default_tool_parser_name(["Qwen3NextForCausalLM"], "") == "hermes"
    # the template's own markers win over the architecture
    assert default_tool_parser_name(["KimiLinearForCausalLM"], "... <tool_call> ...") == "hermes"
    assert default_tool_parser_name(None, "{{'<|tool_calls_section_begin|>'}}") == "kimi_k2"
