"""What clients send beyond the basics: batched prompts, echo with prompt logprobs, the tokenizer
endpoints, logprobs details and the API key; references are ``LLM`` on its own engine and OpenAI's shapes."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from deltaserve import LLM, SamplingParams
from helpers_engine import random_prompts
from helpers_server import MODEL_NAME, make_model, serve_in_thread

MAX_MODEL_LEN = 128


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model_dir = make_model(tmp_path_factory.mktemp("server_clients"))
    with serve_in_thread(model_dir, max_model_len=MAX_MODEL_LEN, max_num_seqs=8) as running:
        yield running


@pytest.fixture(scope="module")
def llm(server):
    return LLM(model=str(server.model_dir), dtype="float32", max_model_len=MAX_MODEL_LEN)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.openai_base_url, api_key="unused", max_retries=0, timeout=60)


def post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json=body, timeout=60)


def test_batched_prompts_give_choices_indexed_prompt_by_prompt(client, llm):
    texts = ["The state", "of a linear", "attention layer"]
    ids = random_prompts([5, 9], seed=1)
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True, n=2)
    for prompt in (texts, ids):
        out = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=5, temperature=0, n=2,
                                        extra_body={"ignore_eos": True})
        expected = llm.generate(prompt, params, use_tqdm=False)
        assert [c.index for c in out.choices] == list(range(2 * len(prompt)))
        assert [c.text for c in out.choices] == [c.text for e in expected for c in e.outputs]
        assert out.usage.prompt_tokens == sum(len(e.prompt_token_ids) for e in expected)
        assert out.usage.completion_tokens == 5 * 2 * len(prompt)


def test_echo_logprobs_of_a_batch_of_token_prompts_equal_llm_prompt_logprobs(server, llm):
    # lm-eval's loglikelihood request: four token-id prompts, echo, logprobs 1, max_tokens 1.
    prompts = random_prompts([6, 11, 3, 17], seed=2)
    body = {"model": MODEL_NAME, "prompt": prompts, "temperature": 0, "max_tokens": 1, "logprobs": 1, "echo": True,
            "seed": 1234}
    choices = sorted(post(server, "/v1/completions", body).json()["choices"], key=lambda c: c["index"])
    expected = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=1), use_tqdm=False)
    tokenizer = llm.get_tokenizer()
    for prompt, choice, reference in zip(prompts, choices, expected):
        logprobs = choice["logprobs"]
        assert len(logprobs["tokens"]) == len(prompt) + 1
        assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
        want = [reference.prompt_logprobs[i][t].logprob for i, t in enumerate(prompt) if i > 0]
        assert logprobs["token_logprobs"][1:len(prompt)] == pytest.approx(want, abs=1e-5)
        assert choice["text"].startswith(tokenizer.decode(prompt))
        assert all(0 <= o <= len(choice["text"]) for o in logprobs["text_offset"])


def test_echo_with_max_tokens_zero_returns_the_prompt_alone(server):
    body = {"model": MODEL_NAME, "prompt": "Once upon", "max_tokens": 0, "echo": True, "logprobs": 0}
    out = post(server, "/v1/completions", body).json()
    choice = out["choices"][0]
    assert choice["text"] == "Once upon" and out["usage"]["completion_tokens"] == 0
    assert len(choice["logprobs"]["tokens"]) == out["usage"]["prompt_tokens"]
    assert post(server, "/v1/completions", {**body, "echo": False}).status_code == 400


def test_prompt_logprobs_field_in_vllm_shape(server, llm):
    (prompt,) = random_prompts([7], seed=3)
    body = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": 1, "prompt_logprobs": 2}
    entries = post(server, "/v1/completions", body).json()["choices"][0]["prompt_logprobs"]
    reference = llm.generate([prompt], SamplingParams(max_tokens=1, prompt_logprobs=2), use_tqdm=False)[0]
    assert entries[0] is None and len(entries) == len(prompt)
    for position in range(1, len(prompt)):
        entry = entries[position][str(prompt[position])]
        assert entry["logprob"] == pytest.approx(reference.prompt_logprobs[position][prompt[position]].logprob, abs=1e-5)
        assert len(entries[position]) >= 2


def test_logprobs_zero_returns_the_sampled_token(client):
    out = client.completions.create(model=MODEL_NAME, prompt="abc", max_tokens=4, logprobs=0, seed=5,
                                    extra_body={"ignore_eos": True})
    logprobs = out.choices[0].logprobs
    for token, logprob, top in zip(logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs):
        assert len(top) == 1 and list(top.values()) == [logprob]


def test_top_logprobs_keep_k_distinct_tokens_when_texts_collide(server):
    # Byte tokens 0x80-0xff each decode to U+FFFD alone: a dict keyed by text would merge them.
    body = {"model": MODEL_NAME, "prompt": "abc", "max_tokens": 6, "logprobs": 5, "temperature": 0,
            "ignore_eos": True, "logit_bias": {str(t): 50.0 for t in range(0x80, 0x90)}}
    out = post(server, "/v1/completions", body).json()["choices"][0]["logprobs"]
    for top in out["top_logprobs"]:
        assert len(top) == 5
        assert sum(key.startswith("token_id:") for key in top) >= 3


def _stream_completion(server, body: dict) -> tuple[str, list[int], list[str]]:
    text, offsets, tokens = "", [], []
    with httpx.stream("POST", f"{server.url}/v1/completions", json={**body, "stream": True}, timeout=60) as response:
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                choice = json.loads(line[6:])["choices"][0]
                text += choice["text"]
                if choice["logprobs"]:
                    offsets += choice["logprobs"]["text_offset"]
                    tokens += choice["logprobs"]["tokens"]
                    assert all(o <= len(text) for o in offsets), "an offset ran past the text sent so far"
    return text, offsets, tokens


@pytest.mark.parametrize("stop", [None, "a"])
def test_text_offset_is_the_same_streamed_and_not_and_stays_in_the_text(server, stop):
    # Multi-byte characters (held back until complete) and a stop string (held back, then cut).
    body = {"model": MODEL_NAME, "prompt": "x", "max_tokens": 24, "logprobs": 1, "temperature": 0,
            "ignore_eos": True, "logit_bias": {str(0xe2): 3.0, str(0x82): 3.0, str(0x61): 2.0}}
    if stop:
        body["stop"] = stop
    whole = post(server, "/v1/completions", body).json()["choices"][0]
    text, offsets, tokens = _stream_completion(server, body)
    assert text == whole["text"]
    assert offsets == whole["logprobs"]["text_offset"] and tokens == whole["logprobs"]["tokens"]
    assert offsets == sorted(offsets) and all(0 <= o <= len(text) for o in offsets)


def test_tokenize_detokenize_tokenizer_info_version(server, llm):
    tokenizer = llm.get_tokenizer()
    out = post(server, "/tokenize", {"model": MODEL_NAME, "prompt": "héllo", "add_special_tokens": False}).json()
    assert out["tokens"] == tokenizer.encode("héllo", add_special_tokens=False)
    assert out["count"] == len(out["tokens"]) and out["max_model_len"] == MAX_MODEL_LEN
    chat = post(server, "/tokenize", {"messages": [{"role": "user", "content": "hi"}]}).json()
    assert chat["tokens"] == tokenizer.encode("user: hi\nassistant:", add_special_tokens=False)
    assert post(server, "/detokenize", {"tokens": out["tokens"]}).json() == {"prompt": "héllo"}
    assert post(server, "/detokenize", {"tokens": [10**6]}).status_code == 400
    info = httpx.get(f"{server.url}/tokenizer_info").json()
    assert info["eos_token"] == tokenizer.eos_token and info["chat_template"] == tokenizer.chat_template
    assert httpx.get(f"{server.url}/version").json()["version"]


def test_api_key_guards_every_v1_route_and_leaves_health_open(tmp_path):
    with serve_in_thread(make_model(tmp_path), api_key="s3cret", max_model_len=64) as running:
        for method, path in (("GET", "/v1/models"), ("POST", "/v1/completions"), ("POST", "/v1/chat/completions")):
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
                response = httpx.request(method, f"{running.url}{path}", headers=headers, json={}, timeout=30)
                assert response.status_code == 401
                assert response.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(f"{running.url}/health").status_code == 200
        good = openai.OpenAI(base_url=running.openai_base_url, api_key="s3cret", max_retries=0)
        assert good.completions.create(model=MODEL_NAME, prompt="a", max_tokens=2).usage.completion_tokens >= 1
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=running.openai_base_url, api_key="nope", max_retries=0).models.list()


def test_docs_list_every_request_field_implemented_or_refused():
    from pathlib import Path

    from deltaserve.server.protocol import REFUSED_FIELDS, ChatCompletionRequest, CompletionRequest

    docs = (Path(__file__).parents[1] / "docs" / "server.md").read_text()
    fields = set(CompletionRequest.model_fields) | set(ChatCompletionRequest.model_fields) | set(REFUSED_FIELDS)
    missing = sorted(name for name in fields if f"`{name}`" not in docs)
    assert not missing, f"docs/server.md does not list {missing}"
