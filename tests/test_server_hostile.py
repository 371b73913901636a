"""Hostile input never takes the server down: each case is refused (or contained) and the next
request is served, with nothing held afterwards."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import pytest

from deltaserve.server.engine_loop import RequestStream
from helpers_server import MODEL_NAME, make_model, read_metrics, serve_in_thread, wait_until_idle

MAX_MODEL_LEN = 64
CHAT = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module", params=[False, True], ids=["sync", "async_scheduling"])
def server(request, tmp_path_factory):
    model_dir = make_model(tmp_path_factory.mktemp("server_hostile"))
    with serve_in_thread(model_dir, max_model_len=MAX_MODEL_LEN, max_num_seqs=8, async_scheduling=request.param) as running:
        yield running


def post(server, path: str, body, **kwargs) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json=body, timeout=60, **kwargs)


def assert_still_serving(server) -> None:
    """The next request is served, and afterwards no request holds a slot or a block."""
    out = post(server, "/v1/completions", {"model": MODEL_NAME, "prompt": "ok", "max_tokens": 2, "ignore_eos": True})
    assert out.status_code == 200 and out.json()["usage"]["completion_tokens"] == 2
    metrics = wait_until_idle(server.url, 30)
    assert metrics["deltaserve_state_slots_used"] == 0 and metrics["deltaserve_kv_blocks_used"] == 0


def completion(**fields) -> dict:
    return {"model": MODEL_NAME, "prompt": "a", "max_tokens": 2, **fields}


REFUSED = {
    # integers far out of range (they once reached torch inside the engine thread)
    "max_tokens 2**70": (completion(max_tokens=2**70), "max_tokens"),
    "n 10**30": (completion(n=10**30), "n"),
    "top_k 2**63": (completion(top_k=2**63), "top_k"),
    "seed 2**64": (completion(seed=2**64), "seed"),
    "logprobs 10**20": (completion(logprobs=10**20), "logprobs"),
    "min_tokens 2**40": (completion(min_tokens=2**40), "min_tokens"),
    "stop_token_ids 2**63": (completion(stop_token_ids=[2**63]), "stop_token_ids"),
    "prompt token 2**64": (completion(prompt=[2**64]), "prompt"),
    "prompt token past the vocabulary": (completion(prompt=[1, 100000]), "prompt"),
    "logit_bias key past int32": (completion(logit_bias={"99999999999": 1.0}), "logit_bias"),
    "logit_bias id past the vocabulary": (completion(logit_bias={"5000": 1.0}), "logit_bias"),
    "logit_bias value": (completion(logit_bias={"5": 1e9}), "logit_bias"),
    "repetition_penalty 0": (completion(repetition_penalty=0), "repetition_penalty"),
    # strict types
    "max_tokens as a string": (completion(max_tokens="2"), "max_tokens"),
    "n as a float": (completion(n=2.0), "n"),
    "a boolean token id": (completion(prompt=[True, 5]), "prompt"),
    "stream as a string": (completion(stream="yes"), "stream"),
    # stop caps
    "17 stop strings": (completion(stop=[str(i) for i in range(17)]), "stop"),
    "a 257-character stop string": (completion(stop="x" * 257), "stop"),
    # refused fields (would change the output, not implemented)
    "functions": ({"model": MODEL_NAME, "messages": CHAT, "functions": [{"name": "f"}]}, "functions"),
    "tool_choice without tools": ({"model": MODEL_NAME, "messages": CHAT, "tool_choice": "required"}, "tool_choice"),
    "function_call": ({"model": MODEL_NAME, "messages": CHAT, "function_call": "auto"}, "function_call"),
    "tools on completions": (completion(tools=[{"type": "function", "function": {"name": "f"}}]), "tools"),
    "guided_whitespace_pattern": (completion(guided_json={"type": "object"}, guided_whitespace_pattern=" "),
                                  "guided_whitespace_pattern"),
    "suffix": (completion(suffix="end"), "suffix"),
    "best_of": (completion(best_of=3), "best_of"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_refused_with_400_naming_the_field_and_the_server_keeps_serving(server, case):
    body, field = REFUSED[case]
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    response = post(server, path, body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == field and field in error["message"] and error["type"] == "invalid_request_error"
    assert_still_serving(server)


@pytest.mark.parametrize("path, body", [
    ("/v1/completions", '{"model": "tiny", "prompt": "bad \\ud800 surrogate"}'),
    ("/v1/chat/completions", '{"model": "tiny", "messages": [{"role": "user", "content": "\\udfff"}]}'),
    ("/tokenize", '{"prompt": "\\ud83d"}'),
])
def test_lone_surrogates_are_400_in_the_openai_shape(server, path, body):
    response = httpx.post(f"{server.url}{path}", content=body.encode(), timeout=30,
                          headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    assert_still_serving(server)


def test_a_tiny_temperature_is_greedy_not_token_zero(server):
    greedy = post(server, "/v1/completions", completion(max_tokens=8, temperature=0, ignore_eos=True)).json()
    tiny = post(server, "/v1/completions", completion(max_tokens=8, temperature=1e-40, ignore_eos=True)).json()
    assert tiny["choices"][0]["text"] == greedy["choices"][0]["text"]


def test_bodies_over_the_limit_are_413(server):
    big = b'{"prompt": "' + b"a" * (9 << 20) + b'"}'
    response = httpx.post(f"{server.url}/v1/completions", content=big, timeout=60,
                          headers={"content-type": "application/json"})
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"

    def chunks():  # no Content-Length: the limit applies as the body streams in
        for _ in range(10):
            yield b"a" * (1 << 20)

    response = httpx.post(f"{server.url}/v1/completions", content=chunks(), timeout=60,
                          headers={"content-type": "application/json"})
    assert response.status_code == 413
    assert_still_serving(server)


def test_a_huge_prompt_is_refused_before_tokenizing_and_tokenizing_is_off_the_event_loop(server):
    # 5 MB of text cannot fit 64 tokens of context: refused at once, while /health keeps answering.
    result = {}

    def send_big():
        result["response"] = post(server, "/v1/completions", completion(prompt="ab" * (5 << 19)))

    sender = threading.Thread(target=send_big)
    sender.start()
    latencies = []
    while sender.is_alive():
        start = time.monotonic()
        httpx.get(f"{server.url}/health", timeout=30)
        latencies.append(time.monotonic() - start)
        time.sleep(0.02)
    sender.join()
    assert result["response"].status_code == 400
    assert result["response"].json()["error"]["code"] == "context_length_exceeded"
    assert max(latencies) < 0.5, latencies
    # A prompt that may fit is tokenized on the tokenizer thread, not on the event loop's.
    tokenizer = server.engine.tokenizer
    encode, threads = tokenizer.encode, []
    tokenizer.encode = lambda *a, **k: threads.append(threading.current_thread().name) or encode(*a, **k)
    try:
        assert post(server, "/v1/completions", completion(prompt="abc")).status_code == 200
    finally:
        del tokenizer.encode
    assert threads and all(name.startswith("deltaserve-tokenize") for name in threads), threads
    assert_still_serving(server)


def test_a_stream_nobody_reads_does_not_hold_the_server(server):
    body = completion(n=16, max_tokens=MAX_MODEL_LEN - 2, stream=True, ignore_eos=True, logprobs=5)
    with httpx.Client(timeout=60) as client:
        with client.stream("POST", f"{server.url}/v1/completions", json=body) as response:
            assert response.status_code == 200
            assert_still_serving(server)  # the unread stream's request runs to its end meanwhile
    assert_still_serving(server)


def test_the_mailbox_keeps_only_the_newest_output():
    class Output:
        def __init__(self, i, finished=False):
            self.i, self.finished = i, finished

    async def scenario():
        stream = RequestStream("r", asyncio.get_running_loop())
        for i in range(1000):
            stream.put_threadsafe(Output(i))
        stream.put_threadsafe(Output(1000, finished=True))
        stream.put_threadsafe(Output(1001))  # nothing replaces a finished output
        await asyncio.sleep(0)
        return await stream.next()

    assert asyncio.run(scenario()).i == 1000


def test_a_failure_one_request_causes_fails_that_request_alone(server):
    engine = server.engine
    check = engine.stop_checker

    def failing_check(seq):
        if seq.params.seed == 666:
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "a tokenizer that cannot decode")
        check(seq)

    engine.stop_checker = failing_check
    try:
        failed = post(server, "/v1/completions", completion(seed=666, max_tokens=5))
        assert failed.status_code == 500 and failed.json()["error"]["code"] == "request_failed"
        body = completion(seed=666, max_tokens=5, stream=True)
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as response:
            events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
        assert json.loads(events[-2])["error"]["code"] == "request_failed" and events[-1] == "[DONE]"
        assert_still_serving(server)
    finally:
        engine.stop_checker = check
    stats = read_metrics(server.url)
    assert stats["deltaserve_state_slots_used"] == 0


def test_an_engine_failure_fails_open_requests_and_reports_it(tmp_path):
    failures = []
    with serve_in_thread(make_model(tmp_path), max_model_len=64, app_kwargs={"on_engine_failure": failures.append}
                         ) as running:
        def broken(batch):
            raise RuntimeError("device lost")

        running.engine.runner.run = broken
        response = post(running, "/v1/completions", completion())
        assert response.status_code == 503 and "device lost" in response.json()["error"]["message"]
        deadline = time.monotonic() + 10
        while not failures and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(failures) == 1 and "device lost" in str(failures[0])
        assert httpx.get(f"{running.url}/health").status_code == 503
        assert post(running, "/v1/completions", completion()).status_code == 503


def test_serve_exits_with_status_1_after_an_engine_failure(tmp_path, monkeypatch):
    import socket

    from deltaserve.cli import build_parser
    from deltaserve.commands import serve

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    real_build = serve.build_server

    def build_broken(args):
        server = real_build(args)

        def broken(batch):
            raise RuntimeError("device lost")

        server.engine_loop.engine.runner.run = broken
        return server

    monkeypatch.setattr(serve, "build_server", build_broken)
    args = build_parser().parse_args(["serve", "--model", str(make_model(tmp_path)), "--port", str(port),
                                      "--max-model-len", "64", "--dtype", "float32", "--log-level", "error"])
    result = {}
    thread = threading.Thread(target=lambda: result.update(code=serve.run(args)), daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.05)
    assert post(type("S", (), {"url": url}), "/v1/completions", completion()).status_code == 503
    thread.join(30)
    assert not thread.is_alive() and result["code"] == 1
