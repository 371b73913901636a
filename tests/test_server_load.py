"""The server under load: many concurrent streams, clients that leave mid-stream, and overload.

One server for the module: 32 sequences run, 32 more may wait (``--max-queue 32``), so 64 clients
fit exactly and the 65th is refused. Prefix caching is on (the default): "free" means nothing held
by a running sequence, and whatever is still in use is held by the prefix cache alone.
"""

from __future__ import annotations

import asyncio
import time

import httpx
import openai
import pytest

from helpers_server import MODEL_NAME, make_model, read_metrics, serve_in_thread, wait_until_idle

MAX_NUM_SEQS = 32
MAX_QUEUE = 32
NUM_CLIENTS = MAX_NUM_SEQS + MAX_QUEUE


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model_dir = make_model(tmp_path_factory.mktemp("server_load"))
    with serve_in_thread(model_dir, max_queue=MAX_QUEUE, max_model_len=512, max_num_seqs=MAX_NUM_SEQS) as running:
        yield running


def _assert_all_free(metrics: dict[str, float]) -> None:
    assert metrics["deltaserve_num_requests_running"] == 0
    assert metrics["deltaserve_num_requests_waiting"] == 0
    # NOTE: what only the prefix cache holds counts as free: an idle server reads 0% used.
    assert metrics["deltaserve_state_slots_used"] == 0 and metrics["deltaserve_state_pool_usage_perc"] == 0
    assert metrics["deltaserve_kv_blocks_used"] == 0 and metrics["deltaserve_kv_cache_usage_perc"] == 0


async def _one_client(client: openai.AsyncOpenAI, i: int) -> tuple[int, int, str | None]:
    """A streaming client of either endpoint; returns (asked tokens, tokens received, finish reason)."""
    max_tokens = 3 + (7 * i) % 23
    prompt = "abcdefghij"[: 1 + i % 10] * (1 + i % 4)
    finish, received = None, 0
    if i % 2:
        stream = await client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=max_tokens, stream=True,
                                                 logprobs=0, extra_body={"ignore_eos": True})
        async for chunk in stream:
            for choice in chunk.choices:
                received += len(choice.logprobs.tokens) if choice.logprobs else 0
                finish = choice.finish_reason or finish
    else:
        stream = await client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": prompt}],
                                                      max_tokens=max_tokens, stream=True, logprobs=True,
                                                      extra_body={"ignore_eos": True})
        async for chunk in stream:
            for choice in chunk.choices:
                received += len(choice.logprobs.content) if choice.logprobs and choice.logprobs.content else 0
                finish = choice.finish_reason or finish
    return max_tokens, received, finish


def test_64_concurrent_streams_all_complete_and_free_everything(server):
    async def main():
        async with openai.AsyncOpenAI(base_url=server.openai_base_url, api_key="unused", max_retries=0,
                                      timeout=120) as client:
            return await asyncio.gather(*(_one_client(client, i) for i in range(NUM_CLIENTS)))

    results = asyncio.run(main())
    for max_tokens, received, finish in results:
        assert (received, finish) == (max_tokens, "length")
    _assert_all_free(read_metrics(server.url))


async def _open_stream(http: httpx.AsyncClient, max_tokens: int) -> httpx.Response:
    body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "go"}], "max_tokens": max_tokens,
            "stream": True, "ignore_eos": True}
    response = await http.send(http.build_request("POST", "/v1/chat/completions", json=body), stream=True)
    assert response.status_code == 200
    return response


def test_clients_leaving_mid_stream_free_their_slots_at_once(server):
    num_clients, max_tokens = 16, 400
    before = read_metrics(server.url)

    async def main():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as http:
            responses = await asyncio.gather(*(_open_stream(http, max_tokens) for _ in range(num_clients)))
            # Read until each has real tokens (past the role chunk), then hang up.
            for response in responses:
                lines = response.aiter_lines()
                seen = 0
                while seen < 3:
                    seen += (await lines.__anext__()).startswith("data: ")
                await response.aclose()

    start = time.monotonic()
    asyncio.run(main())
    after = wait_until_idle(server.url, timeout=20)
    _assert_all_free(after)
    assert after['deltaserve_request_success_total{finished_reason="abort"}'] - before.get(
        'deltaserve_request_success_total{finished_reason="abort"}', 0) == num_clients
    generated = after["deltaserve_generation_tokens_total"] - before["deltaserve_generation_tokens_total"]
    assert generated < num_clients * max_tokens / 2, f"requests ran on after their clients left ({generated} tokens)"
    assert time.monotonic() - start < 20


def test_overload_answers_503_with_retry_after(server):
    async def main():
        async with httpx.AsyncClient(base_url=server.url, timeout=60,
                                     limits=httpx.Limits(max_connections=NUM_CLIENTS + 4)) as http:
            responses = await asyncio.gather(*(_open_stream(http, 400) for _ in range(NUM_CLIENTS)))
            try:
                refused = await http.post("/v1/completions", json={"model": MODEL_NAME, "prompt": "a", "max_tokens": 2})
            finally:
                for response in responses:
                    await response.aclose()
            return refused

    refused = asyncio.run(main())
    assert refused.status_code == 503
    assert int(refused.headers["Retry-After"]) >= 1
    error = refused.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and "overloaded" in error["message"]
    _assert_all_free(wait_until_idle(server.url, timeout=20))
    # Once the queue drains, requests are admitted again.
    body = {"model": MODEL_NAME, "prompt": "a", "max_tokens": 2}
    ok = httpx.post(f"{server.url}/v1/completions", json=body, timeout=30)
    assert ok.status_code == 200


def test_non_streaming_client_leaving_aborts_its_request(server):
    before = read_metrics(server.url)
    body = {"model": MODEL_NAME, "prompt": "a", "max_tokens": 400, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/completions", json=body, timeout=httpx.Timeout(30, read=0.5))
    after = wait_until_idle(server.url, timeout=20)
    _assert_all_free(after)
    aborted = 'deltaserve_request_success_total{finished_reason="abort"}'
    assert after[aborted] - before.get(aborted, 0) == 1
