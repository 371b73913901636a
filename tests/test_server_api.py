"""The OpenAI-compatible server, through the official ``openai`` client and raw ``httpx``.

One server (tiny model, fp32, in a background thread) serves every test of this module. The
references are independent of the server: ``deltaserve.LLM.generate`` on its own engine, the chat
template written out by hand, and the OpenAI API's documented shapes.
"""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from deltaserve import LLM, SamplingParams
from deltaserve.models.tiny import make_tokenizer
from deltaserve.server.protocol import ChatCompletionRequest, ChatMessage
from deltaserve.server.serving import chat_prompt
from helpers_server import MODEL_NAME, make_model, read_metrics, serve_in_thread

MAX_MODEL_LEN = 128
PROMPT = "The state of a linear attention layer"


@pytest.fixture(scope="module", params=[False, True], ids=["sync", "async_scheduling"])
def server(request, tmp_path_factory):
    # NOTE: async scheduling (the CUDA default) runs here on the CPU too: the same answers, one step later.
    model_dir = make_model(tmp_path_factory.mktemp("server_api"))
    with serve_in_thread(model_dir, max_model_len=MAX_MODEL_LEN, max_num_seqs=8, async_scheduling=request.param) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.openai_base_url, api_key="unused", max_retries=0, timeout=60)


def _greedy_text(client, prompt: str, max_tokens: int, **kwargs) -> str:
    out = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                    extra_body={"ignore_eos": True}, **kwargs)
    return out.choices[0].text


def test_models_lists_the_served_model(client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL_NAME]


def test_health_is_ok(server):
    response = httpx.get(f"{server.url}/health")
    assert response.status_code == 200 and response.json()["status"] == "ok"


def test_greedy_completion_equals_llm_generate(server, client):
    llm = LLM(model=str(server.model_dir), dtype="float32", max_model_len=MAX_MODEL_LEN)
    expected = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)[0]
    out = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=12, temperature=0, logprobs=0,
                                    extra_body={"ignore_eos": True})
    choice = out.choices[0]
    tokenizer = llm.get_tokenizer()
    assert choice.text == expected.outputs[0].text
    assert choice.logprobs.tokens == [tokenizer.decode([t]) for t in expected.outputs[0].token_ids]
    assert out.usage.prompt_tokens == len(tokenizer.encode(PROMPT))
    assert out.usage.completion_tokens == 12 and choice.finish_reason == "length"


def test_completion_stream_adds_up_to_the_whole_text(client):
    expected = _greedy_text(client, PROMPT, 10)
    stream = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=10, temperature=0, stream=True,
                                       stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10


def test_chat_renders_the_checkpoint_template(client):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    # The tiny checkpoint's template, written out: "<role>: <content>\n" per message, then "assistant:".
    expected = _greedy_text(client, "system: Be brief.\nuser: hi\nassistant:", 8)
    out = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=8, temperature=0,
                                         extra_body={"ignore_eos": True})
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == expected
    assert out.usage.completion_tokens == 8


def test_chat_stream_opens_with_the_role_and_adds_up(client):
    messages = [{"role": "user", "content": "hi"}]
    expected = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=8, temperature=0,
                                              extra_body={"ignore_eos": True}).choices[0].message.content
    chunks = list(client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=8, temperature=0,
                                                 stream=True, stream_options={"include_usage": True},
                                                 extra_body={"ignore_eos": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 8


def test_chat_fallback_template_without_a_checkpoint_template():
    tokenizer = make_tokenizer()
    tokenizer.chat_template = None
    messages = [ChatMessage(role="system", content="s"), ChatMessage(role="user", content="u")]
    body = ChatCompletionRequest(messages=messages)
    assert chat_prompt(body, tokenizer) == tokenizer.encode("system: s\nuser: u\nassistant: ")


def test_n_gives_n_choices_of_the_asked_length(client):
    out = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=6, n=3, seed=1,
                                    extra_body={"ignore_eos": True})
    assert sorted(c.index for c in out.choices) == [0, 1, 2]
    assert out.usage.completion_tokens == 18
    assert len({c.text for c in out.choices}) > 1, "n samples with one seed should differ (seed + index)"


def test_stop_string_cuts_the_text_before_it(client):
    full = _greedy_text(client, PROMPT, 24)
    stop = next(full[i:i + 2] for i in range(4, len(full) - 1) if full[i:i + 2].isprintable() and full[i:i + 2].strip())
    out = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=24, temperature=0, stop=[stop],
                                    extra_body={"ignore_eos": True})
    assert out.choices[0].text == full[:full.index(stop)]
    assert out.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=24, temperature=0, stop=stop,
                                         stream=True, extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].text for c in streamed) == full[:full.index(stop)]


def test_seed_repeats_the_sample(client):
    def sample(seed):
        return client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=10, temperature=1.0, top_p=0.9,
                                         seed=seed, extra_body={"ignore_eos": True, "top_k": 50}).choices[0].text

    assert sample(7) == sample(7)
    assert sample(7) != sample(8)


def test_completion_logprobs_list_the_top_alternatives(client):
    out = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=5, temperature=0, logprobs=3,
                                    extra_body={"ignore_eos": True})
    logprobs = out.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 5
    for chosen, top in zip(logprobs.token_logprobs, logprobs.top_logprobs):
        assert 1 <= len(top) <= 3 and chosen <= 0
        # Greedy: the chosen token is the most likely one.
        assert chosen == pytest.approx(max(top.values()), abs=1e-6)


def test_chat_logprobs_follow_the_chat_shape(client):
    out = client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                         temperature=0, logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True})
    content = out.choices[0].logprobs.content
    assert len(content) == 4
    for entry in content:
        assert len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob, abs=1e-6)


# ---- errors: OpenAI's shape, status 400, the field named ----------------------------------------

ERROR_CASES = {
    "negative max_tokens": ("completions", {"model": MODEL_NAME, "prompt": "a", "max_tokens": -3}, "max_tokens"),
    "temperature too high": ("completions", {"model": MODEL_NAME, "prompt": "a", "temperature": 2.5}, "temperature"),
    "negative temperature": ("chat/completions", {"model": MODEL_NAME, "messages": [{"role": "user", "content": "a"}],
                                                  "temperature": -0.1}, "temperature"),
    "prompt longer than the context": ("completions", {"model": MODEL_NAME, "prompt": "a" * (MAX_MODEL_LEN + 5)},
                                       "prompt"),
    "messages longer than the context": ("chat/completions", {"model": MODEL_NAME, "messages": [
        {"role": "user", "content": "a" * MAX_MODEL_LEN}]}, "messages"),
    "max_tokens past the context": ("completions", {"model": MODEL_NAME, "prompt": "a", "max_tokens": MAX_MODEL_LEN},
                                    "max_tokens"),
    "presence_penalty out of range": ("completions", {"model": MODEL_NAME, "prompt": "a", "presence_penalty": 2.5},
                                      "presence_penalty"),
    "tool_choice naming no tool": ("chat/completions", {"model": MODEL_NAME, "messages": [
        {"role": "user", "content": "a"}], "tools": [{"type": "function", "function": {"name": "f"}}],
        "tool_choice": {"type": "function", "function": {"name": "g"}}}, "tool_choice"),
    "a tool without a name": ("chat/completions", {"model": MODEL_NAME, "messages": [
        {"role": "user", "content": "a"}], "tools": [{"type": "function", "function": {}}]}, "tools"),
    "missing prompt": ("completions", {"model": MODEL_NAME}, "prompt"),
    "top_p zero": ("completions", {"model": MODEL_NAME, "prompt": "a", "top_p": 0}, "top_p"),
    "top_logprobs without logprobs": ("chat/completions", {"model": MODEL_NAME, "top_logprobs": 2, "messages": [
        {"role": "user", "content": "a"}]}, "top_logprobs"),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_bad_request_is_400_naming_the_field(server, case):
    endpoint, body, field = ERROR_CASES[case]
    response = httpx.post(f"{server.url}/v1/{endpoint}", json=body, timeout=30)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert error["param"] == field
    assert field in error["message"]


def test_unknown_model_is_404_model_not_found(server):
    for endpoint, body in (("completions", {"model": "gpt-4", "prompt": "a"}),
                           ("chat/completions", {"model": "gpt-4", "messages": [{"role": "user", "content": "a"}]})):
        response = httpx.post(f"{server.url}/v1/{endpoint}", json=body, timeout=30)
        assert response.status_code == 404
        assert response.json()["error"]["code"] == "model_not_found" and response.json()["error"]["param"] == "model"


def test_malformed_json_is_400_in_the_openai_shape(server):
    response = httpx.post(f"{server.url}/v1/completions", content=b'{"prompt": "a",', timeout=30,
                          headers={"content-type": "application/json"})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and "JSON" in error["message"]


def test_unknown_path_is_404_in_the_openai_shape(server):
    response = httpx.get(f"{server.url}/v1/engines", timeout=30)
    assert response.status_code == 404
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}


def test_openai_client_raises_bad_request_with_the_message(client):
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model=MODEL_NAME, prompt="a", temperature=9)


# ---- metrics -------------------------------------------------------------------------------------

def test_metrics_count_tokens_and_time_them(server, client):
    before = read_metrics(server.url)
    client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=7, extra_body={"ignore_eos": True})
    after = read_metrics(server.url)
    assert after["deltaserve_generation_tokens_total"] - before["deltaserve_generation_tokens_total"] == 7
    ttft, per_token = "deltaserve_time_to_first_token_seconds", "deltaserve_time_per_output_token_seconds"
    assert after[f"{ttft}_count"] - before[f"{ttft}_count"] == 1
    assert after[f"{per_token}_count"] - before[f"{per_token}_count"] == 6
    assert after[f'{ttft}_bucket{{le="+Inf"}}'] == after[f"{ttft}_count"]
    for name in ("num_requests_running", "num_requests_waiting", "state_slots_used", "kv_blocks_used",
                 "prefix_cache_hit_rate", "prefix_cache_hit_tokens", "prompt_tokens_computed", "state_slots_cached"):
        assert f"deltaserve_{name}" in after


def test_stream_is_json_events_ending_with_done(server):
    body = {"model": MODEL_NAME, "prompt": "a", "max_tokens": 2, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=30) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert all(json.loads(e)["object"] == "text_completion" for e in events[:-1])


def test_chat_stream_deltas_carry_no_null_fields(server):
    body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3,
            "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=30) as response:
        events = [json.loads(line[len("data: "):]) for line in response.iter_lines()
                  if line.startswith("data: ") and line != "data: [DONE]"]
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    deltas = [e["choices"][0]["delta"] for e in events if e["choices"]]
    assert all(None not in delta.values() and set(delta) <= {"role", "content"} for delta in deltas)
    assert [e["choices"][0]["finish_reason"] for e in events if e["choices"]][-1] == "length"


def test_logprobs_of_masked_tokens_stay_valid_json(server):
    # top_k=2 masks all but two tokens, so the third alternative has logprob -inf in the engine;
    # OpenAI writes -9999.0 for such tokens.
    body = {"model": MODEL_NAME, "prompt": PROMPT, "max_tokens": 3, "logprobs": 3, "top_k": 2, "seed": 0,
            "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=30) as response:
        events = [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]
    for event in events[:-1]:
        chunk = json.loads(event, parse_constant=lambda name: pytest.fail(f"non-JSON constant {name}"))
        for choice in chunk["choices"]:
            for top in choice["logprobs"]["top_logprobs"]:
                assert min(top.values()) == -9999.0


def test_usage_reports_prompt_tokens_served_from_the_prefix_cache(client, server):
    # A prompt's end is a checkpoint: a prompt extending it restores all of it.
    prompt = "cached tokens are reported " * 2
    first = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=2, temperature=0)
    again = client.completions.create(model=MODEL_NAME, prompt=prompt + "again", max_tokens=2, temperature=0)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert again.usage.prompt_tokens_details.cached_tokens == first.usage.prompt_tokens
    metrics = read_metrics(server.url)
    assert metrics["deltaserve_prefix_cache_hit_tokens"] >= first.usage.prompt_tokens
    assert metrics["deltaserve_prefix_cache_miss_tokens"] >= first.usage.prompt_tokens
    assert metrics["deltaserve_kv_cache_usage_perc"] == 0 and metrics["deltaserve_state_slots_cached"] > 0
