"""Structured outputs and tool calls through the official ``openai`` client against a real server.

The random tiny model writes random bytes, so every check is one an unconstrained model would fail:
``jsonschema`` validates each JSON answer, Python's ``re`` each regex answer, and a forced tool call
must parse into ``tool_calls`` whose arguments validate against the function's schema. Unconstrained
requests sent together with constrained ones are compared with the same requests sent alone.
"""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor

import httpx
import jsonschema
import openai
import pytest

from helpers_server import MODEL_NAME, make_model, serve_in_thread

SCHEMA = {
    "type": "object",
    "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 99}, "ok": {"type": "boolean"},
                   "tag": {"enum": ["x", "y"]}},
    "required": ["id", "ok", "tag"],
    "additionalProperties": False,
}
REGEX = r"(yes|no)-[0-9]{1,3}"
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
           "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]},
                                                           "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                          "required": ["city", "days"], "additionalProperties": False}}}
CLOCK = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"],
    "additionalProperties": False}}}
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]
SEEDS = range(6)
TOOL_SEEDS = range(4)  # NOTE: fewer: the tools' system prompt is ~900 tokens to prefill


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("server_structured"))


@pytest.fixture(scope="module")
def server(model_dir):
    with serve_in_thread(model_dir, max_model_len=2048, max_num_seqs=16) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.openai_base_url, api_key="unused", max_retries=0, timeout=120)


def _each_seed(fn, seeds=SEEDS) -> list:
    """``fn(seed)`` for every seed, sent at once (they share the engine's batches)."""
    with ThreadPoolExecutor(len(seeds)) as pool:
        return list(pool.map(fn, seeds))


def _chat(client, stream: bool, **kwargs) -> tuple[str, str, list]:
    """(content, finish_reason, tool_calls as dicts) of one chat choice, streamed or not."""
    if not stream:
        choice = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, **kwargs).choices[0]
        calls = [c.model_dump() for c in choice.message.tool_calls or []]
        return choice.message.content or "", choice.finish_reason, calls
    content, finish, calls = "", None, {}
    for chunk in client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, stream=True, **kwargs):
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for call in delta.tool_calls or []:
            entry = calls.setdefault(call.index, {"id": call.id, "type": "function",
                                                  "function": {"name": "", "arguments": ""}})
            entry["function"]["name"] += call.function.name or ""
            entry["function"]["arguments"] += call.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    return content, finish, [calls[i] for i in sorted(calls)]


@pytest.mark.parametrize("stream", [False, True])
def test_json_schema_response_format_validates(client, stream):
    response_format = {"type": "json_schema", "json_schema": {"name": "record", "schema": SCHEMA}}
    for content, finish, _ in _each_seed(lambda seed: _chat(client, stream, response_format=response_format,
                                                              max_tokens=300, seed=seed)):
        assert finish == "stop", content
        jsonschema.validate(json.loads(content), SCHEMA)


@pytest.mark.parametrize("stream", [False, True])
def test_guided_regex_and_choice_on_completions(client, stream):
    def complete(seed, extra):
        out = client.completions.create(model=MODEL_NAME, prompt="Answer:", max_tokens=60, seed=seed,
                                        stream=stream, extra_body=extra)
        chunks = list(out) if stream else [out]
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        return text, [c.choices[0].finish_reason for c in chunks if c.choices][-1]

    for extra, check in (({"guided_regex": REGEX}, lambda t: re.fullmatch(REGEX, t)),
                         ({"guided_choice": ["cat", "dog", "emu"]}, lambda t: t in ("cat", "dog", "emu")),
                         ({"structured_outputs": {"json": SCHEMA, "disable_any_whitespace": True}},
                          lambda t: jsonschema.validate(json.loads(t), SCHEMA) is None and "\n" not in t)):
        for text, finish in _each_seed(lambda seed: complete(seed, extra)):
            assert finish == "stop" and check(text), (extra, text)


def test_json_object_chat(client):
    content, finish, _ = _chat(client, False, response_format={"type": "json_object"}, max_tokens=200, seed=3)
    assert finish in ("stop", "length") and content.lstrip().startswith("{")
    if finish == "stop":
        assert isinstance(json.loads(content), dict)


def test_unconstrained_requests_are_unchanged_by_constrained_neighbours(client):
    def free(seed):
        out = client.completions.create(model=MODEL_NAME, prompt=f"Story {seed}:", max_tokens=20, seed=seed,
                                        temperature=0.8, extra_body={"ignore_eos": True})
        return out.choices[0].text, out.choices[0].finish_reason

    def constrained(seed):
        return client.completions.create(model=MODEL_NAME, prompt="Answer:", max_tokens=60, seed=seed,
                                         extra_body={"guided_regex": REGEX}).choices[0].text

    alone = [free(s) for s in range(3)]
    with ThreadPoolExecutor(8) as pool:
        busy = [pool.submit(constrained, s) for s in range(5)]
        mixed = [pool.submit(free, s) for s in range(3)]
        busy += [pool.submit(constrained, s) for s in range(5, 10)]
        assert [f.result() for f in mixed] == alone
        assert all(re.fullmatch(REGEX, f.result()) for f in busy)


def _check_calls(calls, names):
    assert [c["function"]["name"] for c in calls] == names and calls
    for call in calls:
        schema = {"get_weather": WEATHER, "get_time": CLOCK}[call["function"]["name"]]["function"]["parameters"]
        jsonschema.validate(json.loads(call["function"]["arguments"]), schema)
        assert call["type"] == "function" and call["id"]


@pytest.mark.parametrize("stream", [False, True])
def test_named_tool_choice_returns_a_valid_call(client, stream):
    choice = {"type": "function", "function": {"name": "get_weather"}}
    for content, finish, calls in _each_seed(lambda seed: _chat(client, stream, tools=[CLOCK, WEATHER], seed=seed,
                                                                 tool_choice=choice, max_tokens=200), TOOL_SEEDS):
        assert finish == "tool_calls" and content == ""
        _check_calls(calls, ["get_weather"])


def test_required_tool_choice_calls_one_of_the_tools(client):
    for _, finish, calls in _each_seed(lambda seed: _chat(client, False, tools=[CLOCK, WEATHER], seed=seed,
                                                           tool_choice="required", max_tokens=300,
                                                           parallel_tool_calls=False), TOOL_SEEDS):
        assert finish == "tool_calls", calls
        assert len(calls) == 1
        _check_calls(calls, [calls[0]["function"]["name"]])


def test_auto_and_none_leave_the_random_model_free(client):
    # The random model does not write a well-formed <tool_call> block: its text comes back as content.
    for tool_choice in ("auto", "none"):
        content, finish, calls = _chat(client, False, tools=[WEATHER], tool_choice=tool_choice, max_tokens=16,
                                       seed=1)
        assert calls == [] and finish in ("stop", "length") and content


@pytest.mark.parametrize("stream", [False, True])
def test_auto_parses_a_call_and_returns_a_malformed_one_as_content(client, stream):
    """A grammar makes the random model write a given text under tool_choice="auto"."""
    good = 'Sure.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "days": 3}}\n</tool_call>'
    bad = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Os\n</tool_call>'
    content, finish, calls = _chat(client, stream, tools=[WEATHER], max_tokens=120,
                                   extra_body={"guided_choice": [good]})
    assert finish == "tool_calls" and content == "Sure."
    _check_calls(calls, ["get_weather"])
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Oslo", "days": 3}
    content, finish, calls = _chat(client, stream, tools=[WEATHER], max_tokens=120,
                                   extra_body={"guided_choice": [bad]})
    assert (content, finish, calls) == (bad, "stop", [])


def test_tool_history_renders_through_the_template(client):
    messages = MESSAGES + [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Paris", "days": 1}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    out = client.chat.completions.create(model=MODEL_NAME, messages=messages, tools=[WEATHER], max_tokens=4,
                                         extra_body={"ignore_eos": True})
    assert out.choices[0].finish_reason == "length"
    # The tiny template written out (byte tokens: one per byte): tools, the call as a block, the tool's answer.
    tools = "".join("\n" + json.dumps(t, ensure_ascii=False) for t in [WEATHER])
    text = ("system: # Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
            f"You are provided with function signatures within <tools></tools> XML tags:\n<tools>{tools}\n</tools>\n\n"
            "For each function call, return a json object with function name and arguments within "
            "<tool_call></tool_call> XML tags:\n<tool_call>\n"
            '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>\n'
            "user: What is the weather in Paris?\n"
            'assistant: <tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 1}}\n</tool_call>\n'
            "tool: <tool_response>\nsunny\n</tool_response>\nassistant:")
    assert out.usage.prompt_tokens == len(text.encode())


@pytest.mark.parametrize("endpoint, body, field, problem", [
    ("completions", {"prompt": "a", "guided_regex": "(ab"}, "guided_regex", "parenthesis"),
    ("completions", {"prompt": "a", "guided_json": '{"type": '}, "guided_json", "JSON"),
    ("chat/completions", {"messages": MESSAGES, "response_format": {"type": "json_schema",
                          "json_schema": {"name": "x", "schema": {"type": "nope"}}}}, "response_format", "nope"),
    ("chat/completions", {"messages": MESSAGES, "response_format": {"type": "xml"}}, "response_format", "json_schema"),
    ("completions", {"prompt": "a", "guided_grammar": "root ::= missing"}, "guided_grammar", "missing"),
    ("completions", {"prompt": "a", "guided_regex": "a", "guided_choice": ["b"]}, "guided_choice", "only one"),
    ("chat/completions", {"messages": MESSAGES, "tool_choice": "required"}, "tool_choice", "tools"),
    ("chat/completions", {"messages": MESSAGES, "tools": [WEATHER], "tool_choice": "required",
                          "response_format": {"type": "json_object"}}, "response_format", "tool"),
])
def test_bad_constraint_is_400_naming_the_field(server, endpoint, body, field, problem):
    response = httpx.post(f"{server.url}/v1/{endpoint}", json={"model": MODEL_NAME, **body}, timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == field and problem in error["message"], error


def test_kimi_format_forced_call(model_dir):
    """The same forced call with the kimi_k2 parser: the grammar writes Kimi's markers, the parser reads them."""
    with serve_in_thread(model_dir, max_model_len=2048, max_num_seqs=4, tool_call_parser="kimi_k2") as running:
        client = openai.OpenAI(base_url=running.openai_base_url, api_key="unused", max_retries=0, timeout=120)
        choice = {"type": "function", "function": {"name": "get_weather"}}
        for content, finish, calls in _each_seed(lambda stream: _chat(client, stream, tools=[WEATHER], seed=4,
                                                                      max_tokens=600, tool_choice=choice),
                                                 (False, True)):
            assert finish == "tool_calls" and content == ""
            _check_calls(calls, ["get_weather"])
            assert calls[0]["id"] == "functions.get_weather:" + calls[0]["id"].rsplit(":", 1)[1]
