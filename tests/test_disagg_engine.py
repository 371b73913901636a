"""The engine side of a hand-over, in one process and without NIXL: a prefill engine holds a finished
prompt's slot and blocks, a plain tensor copy moves every registered region, a decode engine admits the
``PrefilledPrompt`` and continues. Tokens are compared with transformers' greedy generation."""

from __future__ import annotations

import pytest

from deltaserve import SamplingParams
from deltaserve.disagg.ledger import KVLedger, NoRoom
from deltaserve.disagg.regions import pool_regions, request_bytes, request_descs
from deltaserve.engine.kv_hooks import PrefilledPrompt
from deltaserve.engine.llm_engine import LLMEngine
from helpers_engine import GreedyReference, assert_all_free, random_prompts
from helpers_model import make_checkpoint, reference_model


# NOTE: the hand-over is generic over state groups and KV-cache specs: KDA + MLA and GDN + GQA alike.
@pytest.fixture(scope="module", params=["kimi_linear", "qwen3_next"])
def checkpoint(tmp_path_factory, request):
    return make_checkpoint(tmp_path_factory.mktemp(f"disagg_engine_{request.param}"), arch=request.param)


@pytest.fixture(scope="module")
def reference(checkpoint):
    return GreedyReference(reference_model(checkpoint))


def _engine(checkpoint) -> tuple[LLMEngine, KVLedger]:
    engine = LLMEngine(model=str(checkpoint), dtype="float32", block_size=4, max_num_seqs=8)
    ledger = KVLedger(engine, hold_timeout_s=60.0)
    engine.scheduler.kv_connector = ledger
    return engine, ledger


@pytest.fixture(scope="module")
def pair(checkpoint):
    return _engine(checkpoint), _engine(checkpoint)


def _run(engine: LLMEngine) -> dict:
    outputs = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            outputs[out.request_id] = out
    return outputs


def _hand_over(prefill, decode, request_id: str, prompt: list[int], max_tokens: int) -> list[int]:
    """Prefill ``prompt``, copy its slot and blocks region by region, decode it; the decoded tokens."""
    (p_engine, p_ledger), (d_engine, d_ledger) = prefill, decode
    p_ledger.expect(request_id)
    p_engine.add_request(request_id, prompt, SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
    _run(p_engine)
    held = p_ledger.held[request_id]
    slot, blocks = d_ledger.reserve(request_id, len(prompt))
    src = pool_regions(p_engine.runner.state_pool, p_engine.runner.kv_cache)
    dst = pool_regions(d_engine.runner.state_pool, d_engine.runner.kv_cache)
    assert [r.name for r, _ in src] == [r.name for r, _ in dst]
    for (region, source), (_, target) in zip(src, dst):
        if region.index == "slot":
            target[:, slot] = source[:, held.slot]
        else:
            target[:, blocks] = source[:, held.block_ids]
    assert p_ledger.release(request_id)
    d_ledger.take_reserved(request_id)
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    d_engine.add_request(request_id, PrefilledPrompt(prompt, slot, blocks, held.first_token), params)
    return _run(d_engine)[request_id].outputs[0].token_ids


@pytest.mark.parametrize("length", [3, 8, 13, 30])
def test_handed_over_request_decodes_the_reference_tokens(pair, reference, length):
    (prompt,) = random_prompts([length], seed=length)
    assert _hand_over(*pair, f"r{length}", prompt, 8) == reference(prompt, 8)
    for engine, ledger in pair:
        assert ledger.stats()["kv_transfer_held_requests"] == ledger.stats()["kv_transfer_reserved_requests"] == 0
        assert_all_free(engine.stats())


def test_prefix_cache_hit_on_the_prefill_side_hands_over_the_same_state(pair, reference):
    (prompt,) = random_prompts([21], seed=99)
    first = _hand_over(*pair, "hit-a", prompt, 6)
    hits = pair[0][0].stats()["prefix_cache_hits"]
    second = _hand_over(*pair, "hit-b", prompt + [7, 9], 6)
    assert pair[0][0].stats()["prefix_cache_hits"] == hits + 1
    assert first == reference(prompt, 6) and second == reference(prompt + [7, 9], 6)


def test_first_token_that_ends_the_request_finishes_on_arrival(pair, reference):
    (prompt,) = random_prompts([9], seed=5)
    assert _hand_over(*pair, "one", prompt, 1) == reference(prompt, 1)
    assert_all_free(pair[1][0].stats())


def test_unread_hold_expires_and_frees(pair):
    (engine, ledger), _ = pair
    ledger.expect("late")
    engine.add_request("late", [1, 2, 3, 4, 5], SamplingParams(temperature=0, max_tokens=1))
    _run(engine)
    assert ledger.stats()["kv_transfer_held_requests"] == 1
    assert ledger.expire(now=float("inf")) == ["late"]
    assert_all_free(engine.stats())


def test_reservation_without_room_is_refused_and_leaves_nothing(pair):
    _, (engine, ledger) = pair
    with pytest.raises(NoRoom, match="KV blocks"):
        ledger.reserve("huge", engine.block_manager.num_blocks * engine.config.block_size + 1)
    assert_all_free(engine.stats())


def test_descriptors_are_the_slot_and_block_views_of_every_region(pair):
    (engine, _), _ = pair
    tensors = pool_regions(engine.runner.state_pool, engine.runner.kv_cache)
    regions = [r for r, _ in tensors]
    rows = request_descs(regions, 3, [5, 2]).tolist()
    expected = []
    for region, tensor in tensors:
        for item in ([3] if region.index == "slot" else [5, 2]):
            for layer in range(tensor.shape[0]):
                view = tensor[layer, item]
                expected.append((view.data_ptr(), view.numel() * view.element_size()))
    assert sorted((a, n) for a, n, _ in rows) == sorted(expected)
    assert request_bytes(regions, 2) == sum(n for _, n in expected)
    groups = engine.runner.state_pool.groups
    assert {r.name for r in regions} == {f"{g}.{t}" for g in groups for t in ("conv", "recurrent")} | {"kv"}


def test_decode_side_checkpoints_the_finished_turn_and_the_next_turn_hits(pair, reference):
    """The decode engine's prefix cache keeps the handed-over request's final state; the next turn
    (prompt + answer + new text), run locally there, hits it and still gives the reference tokens."""
    (prompt,) = random_prompts([14], seed=41)
    answer = _hand_over(*pair, "turn-1", prompt, 5)
    engine, _ = pair[1]
    hits = engine.stats()["prefix_cache_hits"]
    turn = prompt + answer + [3, 1, 4]
    engine.add_request("turn-2", turn, SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))
    assert _run(engine)["turn-2"].outputs[0].token_ids == reference(turn, 5)
    assert engine.stats()["prefix_cache_hits"] == hits + 1
    assert_all_free(engine.stats())
