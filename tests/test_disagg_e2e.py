"""Prefill/decode disaggregation with real processes on loopback: routers, prefill and decode instances.

The reference is a single instance (the same HTTP app in this process): greedy answers must be
identical through a router with 1 + 1 and with 2 + 2 instances, streamed or not, with prefix-cache
hits on the prefill side, and afterwards nothing may be held on any instance. Faults: a decode
instance killed during a transfer, a prefill instance killed after one, a router restarted, a
prefill instance whose state nobody reads (hold timeout).
"""

from __future__ import annotations

import base64
import concurrent.futures
import dataclasses
import signal
import time

import httpx
import pytest
from fastapi import FastAPI

from deltaserve.disagg.connector import nixl_available
from deltaserve.disagg.decode import FAULT_PAUSE_ENV
from deltaserve.models.tiny import make_tiny
from deltaserve.state.wire import WireHeader, model_fingerprint
from helpers_disagg import answer, assert_nothing_held, complete, router, serve, serve_app_in_thread, wait_ready
from helpers_server import make_model, serve_in_thread

pytestmark = pytest.mark.skipif(not nixl_available(), reason="needs NIXL (pip install 'deltaserve[pd]')")

# NOTE: longer than the 64-token capture grid of the prefix cache, so that its end is checkpointed.
SYSTEM = "You are a terse assistant for the state of linear attention; answer in one short line only. " * 2


def workload() -> list[tuple[bool, dict]]:
    """Mixed: short and multi-block prompts, 1 to 20 tokens, chat and completions, a shared prefix, a repeat."""
    jobs = []
    for i, (prompt, max_tokens) in enumerate([
        ("hi", 4), ("The recurrent state of a KDA layer", 12), ("x" * 70, 1), (SYSTEM + "first", 20),
        (SYSTEM + "second", 8), (SYSTEM + "first", 20), ("stop me" * 5, 6),
    ]):
        jobs.append((False, {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": i % 2 == 1}))
    for i, text in enumerate(["hello", "what is a conv state?"]):
        jobs.append((True, {"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": text}],
                            "max_tokens": 10, "temperature": 0, "stream": i == 0}))
    jobs.append((False, {"prompt": "logprobs too", "max_tokens": 3, "temperature": 0, "logprobs": 2}))
    return jobs


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """P1, P2 (prefill), D1, D2 (decode; D2 with DS conv states, pausing its loads while ``pause`` exists), the routers
    A (P1 + D1), B (P1, P2 + D1, D2), C (P2 + D2); plus the single-instance reference in this process."""
    tmp = tmp_path_factory.mktemp("disagg")
    model = make_model(tmp)
    logs = tmp / "logs"
    logs.mkdir()
    pause = tmp / "pause"
    hold = ["--kv-hold-timeout", "4"]
    p1, p2 = serve("P1", "prefill", model, logs, extra=hold), serve("P2", "prefill", model, logs, extra=hold)
    d1 = serve("D1", "decode", model, logs)
    # NOTE: D2 keeps its conv states DS, the prefill instances SD: its loads are converted.
    d2 = serve("D2", "decode", model, logs, env={FAULT_PAUSE_ENV: str(pause)}, extra=["--conv-layout", "DS"])
    routers = {"A": router("A", [p1], [d1], logs), "B": router("B", [p1, p2], [d1, d2], logs),
               "C": router("C", [p2], [d2], logs)}
    procs = [p1, p2, d1, d2, *routers.values()]
    try:
        with serve_in_thread(model) as single:
            wait_ready(procs)
            yield dict(P1=p1, P2=p2, D1=d1, D2=d2, single=single, logs=logs, pause=pause, model=model,
                       procs=procs, **routers)
    finally:
        for proc in procs:
            proc.kill(signal.SIGTERM)


def _run_all(url: str, jobs, stream: bool | None = None) -> list:
    """Every job at once (answers do not depend on the batch): ``(status, result)`` in job order."""
    def one(job):
        chat, body = job
        return complete(url, body if stream is None else dict(body, stream=stream), chat)

    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        return list(pool.map(one, jobs))


def _reference(cluster, jobs):
    out = []
    for (chat, _), (status, result) in zip(jobs, _run_all(cluster["single"].url, jobs, stream=False)):
        assert status == 200, result
        out.append(answer(result, chat))
    return out


def test_1p1d_greedy_answers_match_a_single_instance(cluster):
    jobs = workload()
    expected = _reference(cluster, jobs)
    hits_before = cluster["P1"].stats()["prefix_cache_hits"]
    for (chat, body), want, (status, result) in zip(jobs, expected, _run_all(cluster["A"].url, jobs)):
        assert status == 200, result
        assert answer(result, chat) == want, body
    # NOTE: the shared system prompt and the repeat hit once their first request is in the cache.
    for (chat, body), want, (status, result) in zip(jobs[3:6], expected[3:6], _run_all(cluster["A"].url, jobs[3:6])):
        assert status == 200 and answer(result, chat) == want, body
    assert cluster["P1"].stats()["prefix_cache_hits"] > hits_before  # the shared system prompt, the repeat
    loaded = cluster["D1"].stats()
    assert loaded["kv_transfer_loaded"] >= len(jobs) and loaded["prefix_cache_hits"] == 0


def test_2p2d_32_concurrent_streams_match_and_spread(cluster):
    jobs = [(False, {"prompt": f"stream {i} " * (1 + i % 7), "max_tokens": 3 + i % 4, "temperature": 0,
                     "stream": True}) for i in range(32)]
    expected = _reference(cluster, jobs)
    for (status, result), want in zip(_run_all(cluster["B"].url, jobs), expected):
        assert status == 200 and result["error"] is None, result
        assert answer(result) == want
    metrics = httpx.get(f"{cluster['B'].url}/metrics").text
    for name in ("P1", "P2", "D1", "D2"):
        line = next(l for l in metrics.splitlines() if "instance_requests_total{" in l and cluster[name].url in l)
        assert float(line.split()[-1]) > 0, f"{name} got no request: {line}"


def test_conv_orientation_is_converted_at_hand_over(cluster):
    r = httpx.post(f"{cluster['D2'].url}/disagg/connect", json={"url": cluster["P1"].url}, timeout=30)
    assert r.status_code == 200 and r.json()["convert_conv"] == ["kda"], r.text
    r = httpx.post(f"{cluster['D1'].url}/disagg/connect", json={"url": cluster["P1"].url}, timeout=30)
    assert r.status_code == 200 and r.json()["convert_conv"] == [], r.text


def _fake_prefill(handshake: dict):
    """A peer that answers the hand-shake with ``handshake`` (real HTTP, in a thread)."""
    app = FastAPI()
    app.get("/disagg/handshake")(lambda: handshake)
    return serve_app_in_thread(app)


def _with_header(handshake: dict, header: bytes) -> dict:
    return dict(handshake, header=base64.b64encode(header).decode())


@pytest.mark.parametrize("field", ["model_fingerprint", "model_dtype", "kv.dtype", "groups[kda].conv_dtype"])
def test_mismatched_peer_is_refused_at_hand_shake_naming_the_field(cluster, tmp_path, field):
    real = httpx.get(f"{cluster['P1'].url}/disagg/handshake").json()
    header = WireHeader.from_bytes(base64.b64decode(real["header"]))
    if field == "model_fingerprint":
        header = dataclasses.replace(header, model_fingerprint=model_fingerprint(make_tiny(tmp_path / "other", seed=1)))
    elif field == "model_dtype":
        header = dataclasses.replace(header, model_dtype="bfloat16")
    elif field == "kv.dtype":
        header = dataclasses.replace(header, kv=dataclasses.replace(header.kv, dtype="bfloat16"))
    else:
        header = dataclasses.replace(header, groups=(dataclasses.replace(header.groups[0], conv_dtype="bfloat16"),))
    with _fake_prefill(_with_header(real, header.to_bytes())) as url:
        r = httpx.post(f"{cluster['D1'].url}/disagg/connect", json={"url": url}, timeout=30)
    assert r.status_code == 502, r.text
    message = r.json()["error"]["message"]
    assert "refused at hand-shake" in message and field in message, message


@pytest.mark.parametrize("damage", ["truncated", "corrupted"])
def test_damaged_header_is_refused_at_hand_shake(cluster, damage):
    real = httpx.get(f"{cluster['P1'].url}/disagg/handshake").json()
    data = bytearray(base64.b64decode(real["header"]))
    if damage == "truncated":
        data = data[: len(data) // 2]
    else:
        data[len(data) // 2] ^= 0x01
    with _fake_prefill(_with_header(real, bytes(data))) as url:
        r = httpx.post(f"{cluster['D1'].url}/disagg/connect", json={"url": url}, timeout=30)
    assert r.status_code == 502 and damage in r.json()["error"]["message"], r.text


def test_router_serves_models_health_and_metrics(cluster):
    models = httpx.get(f"{cluster['B'].url}/v1/models").json()
    assert models["data"][0]["id"] == "tiny"
    health = httpx.get(f"{cluster['B'].url}/health").json()
    assert health["status"] == "ok" and len(health["prefill"]) == len(health["decode"]) == 2
    status, result = complete(cluster["B"].url, {"prompt": "two", "n": 2})
    assert status == 400 and "n" in result["error"]["message"]
    status, result = complete(cluster["B"].url, {"prompt": "x", "max_tokens": 0})
    assert status == 400 and "max_tokens" in result["error"]["message"]


def test_nothing_held_after_the_workloads(cluster):
    for name in ("P1", "P2", "D1", "D2"):
        assert_nothing_held(cluster[name])


def test_unread_state_is_released_at_the_hold_timeout(cluster):
    p1 = cluster["P1"]
    r = httpx.post(f"{p1.url}/disagg/prefill", json={"endpoint": "completions", "body": {"prompt": "never read"}},
                   timeout=60)
    assert r.status_code == 200, r.text
    before = p1.stats()
    assert before["kv_transfer_held_requests"] == 1
    after = assert_nothing_held(p1, timeout=20)
    assert after["kv_transfer_expired"] == before["kv_transfer_expired"] + 1


def test_prefill_killed_after_a_hand_over(cluster):
    body = {"prompt": "long answer", "max_tokens": 40, "temperature": 0, "ignore_eos": True, "stream": True}
    want = _reference(cluster, [(False, body)])[0]
    chunks = []
    with httpx.stream("POST", f"{cluster['C'].url}/v1/completions", json=body, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: {") and not chunks:
                cluster["P2"].kill()  # the decode instance already has everything
            chunks.append(line)
    text = "".join(c for c in _stream_texts(chunks))
    assert (text, "length") == want
    status, result = complete(cluster["C"].url, {"prompt": "no prefill left", "max_tokens": 2})
    assert status == 503 and "no healthy prefill instance" in result["error"]["message"]
    for _ in range(3):  # B still has P1: requests that pick the dead P2 are retried there
        status, result = complete(cluster["B"].url, {"prompt": "survivor", "max_tokens": 3, "temperature": 0})
        assert status == 200, result
    for name in ("P1", "D2"):
        assert_nothing_held(cluster[name])


def test_restarted_prefill_is_read_with_fresh_agent_metadata(cluster):
    """P2 comes back on its port with a new NIXL agent: D2, which cached the old one, hand-shakes again."""
    before = cluster["D2"].stats()  # D2 has read from the old P2 (the 32 streams)
    p2 = serve("P2b", "prefill", cluster["model"], cluster["logs"], extra=["--kv-hold-timeout", "4"],
               port=cluster["P2"].port)
    cluster["procs"].append(p2)
    wait_ready([p2])
    deadline = time.monotonic() + 30
    while httpx.get(f"{cluster['C'].url}/health").status_code != 200:  # C's next health check
        assert time.monotonic() < deadline, "router C never saw P2 again"
        time.sleep(0.1)
    body = {"prompt": "after a prefill restart", "max_tokens": 6, "temperature": 0}
    status, result = complete(cluster["C"].url, body)
    assert status == 200, result
    assert answer(result) == _reference(cluster, [(False, body)])[0]
    assert cluster["D2"].stats()["kv_transfer_loaded"] > before["kv_transfer_loaded"]
    cluster["P2"] = p2
    assert_nothing_held(p2)


def _stream_texts(lines: list[str]):
    import json

    for line in lines:
        if line.startswith("data: {"):
            for choice in json.loads(line[6:]).get("choices", []):
                yield choice.get("text") or ""


def test_router_restarted_mid_stream(cluster):
    a = cluster["A"]
    body = {"prompt": "interrupted", "max_tokens": 60, "temperature": 0, "ignore_eos": True, "stream": True}
    with pytest.raises(httpx.HTTPError):
        with httpx.stream("POST", f"{a.url}/v1/completions", json=body, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    a.kill()
    restarted = router("A2", [cluster["P1"]], [cluster["D1"]], cluster["logs"], port=a.port)
    try:
        wait_ready([restarted])
        status, result = complete(restarted.url, {"prompt": "after restart", "max_tokens": 4, "temperature": 0})
        assert status == 200, result
        for name in ("P1", "D1"):
            assert_nothing_held(cluster[name])
    finally:
        restarted.kill(signal.SIGTERM)


def test_decode_killed_during_a_transfer(cluster):
    """B sends one of two requests to D2, which is paused between its reservation and its READ, and killed."""
    d1, d2 = cluster["D1"], cluster["D2"]
    cluster["pause"].touch()
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(complete, cluster["B"].url, {"prompt": f"doomed {i}", "max_tokens": 4,
                                                             "temperature": 0}) for i in range(2)]
        deadline = time.monotonic() + 60
        while d2.stats()["kv_transfer_reserved_requests"] == 0:
            assert time.monotonic() < deadline, "D2 never reserved"
            time.sleep(0.05)
        prefills = [cluster["P1"], cluster["P2"]]  # P2 is the restarted one by now
        assert sum(p.stats()["kv_transfer_held_requests"] for p in prefills) >= 1
        d2.kill()
        results = [f.result(60) for f in futures]
    failed = [r for status, r in results if status != 200]
    assert len(failed) == 1, results
    assert d2.url in failed[0]["error"]["message"] and "decode instance" in failed[0]["error"]["message"]
    for prefill in prefills:  # the router told it to drop the request: no wait for the hold timeout
        assert_nothing_held(prefill, timeout=3)
    for i in range(2):  # D2 is marked down: B keeps serving through D1
        status, result = complete(cluster["B"].url, {"prompt": f"survivor {i}", "max_tokens": 3, "temperature": 0})
        assert status == 200, result
    assert_nothing_held(d1)
