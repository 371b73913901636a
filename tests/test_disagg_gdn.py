"""Disaggregation of a GDN model (Qwen3-Next: Gated DeltaNet + gated GQA with a per-head K/V cache) with
real processes: the same wire format, connector and router as Kimi-Linear, no model-specific code."""

from __future__ import annotations

import base64
import concurrent.futures
import signal

import httpx
import pytest

from deltaserve.disagg.connector import nixl_available
from deltaserve.state.wire import WireHeader
from helpers_disagg import answer, assert_nothing_held, complete, router, serve, wait_ready
from helpers_model import make_checkpoint
from helpers_server import serve_in_thread

pytestmark = pytest.mark.skipif(not nixl_available(), reason="needs NIXL (pip install 'deltaserve[pd]')")


@pytest.fixture(scope="module")
def gdn(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("disagg_gdn")
    model = make_checkpoint(tmp, arch="qwen3_next")
    logs = tmp / "logs"
    logs.mkdir()
    p, d = serve("P", "prefill", model, logs), serve("D", "decode", model, logs)
    r = router("R", [p], [d], logs)
    try:
        with serve_in_thread(model) as single:
            wait_ready([p, d, r])
            yield dict(P=p, D=d, R=r, single=single)
    finally:
        for proc in (p, d, r):
            proc.kill(signal.SIGTERM)


def test_gdn_header_describes_gdn_groups_and_a_per_head_kv_cache(gdn):
    header = WireHeader.from_bytes(base64.b64decode(httpx.get(f"{gdn['P'].url}/disagg/handshake").json()["header"]))
    assert [g.kind for g in header.groups] == ["gdn"] and header.groups[0].conv_split_names == ("q", "k", "v")
    assert header.kv is not None and dict(header.kv.spec)["kind"] == "gqa"


def test_gdn_greedy_answers_match_a_single_instance(gdn):
    # NOTE: longer than the 64-token capture grid, so that the shared prefix is checkpointed.
    prefix = "A shared system prompt about gated delta rules, long enough to be worth a checkpoint. " * 2
    jobs = [(False, {"prompt": prefix + f"question {i}" * (1 + i), "max_tokens": 4 + i, "temperature": 0,
                     "stream": i % 2 == 0}) for i in range(6)]
    jobs.append((True, {"messages": [{"role": "user", "content": "hello gdn"}], "max_tokens": 6, "temperature": 0,
                        "stream": True}))
    jobs += jobs[:2]  # repeats: prefix-cache hits on the prefill side
    want = []
    for chat, body in jobs:
        status, result = complete(gdn["single"].url, dict(body, stream=False), chat)
        assert status == 200, result
        want.append(answer(result, chat))
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda job: complete(gdn["R"].url, job[1], job[0]), jobs[:7]))
    got += [complete(gdn["R"].url, body, chat) for chat, body in jobs[7:]]
    for (chat, body), expected, (status, result) in zip(jobs, want, got):
        assert status == 200, result
        assert answer(result, chat) == expected, body
    assert gdn["P"].stats()["prefix_cache_hits"] > 0
    for name in ("P", "D"):
        assert_nothing_held(gdn[name])
