"""Prefix-cache checkpoints taken inside the forward (tiny Kimi-Linear, float32, CPU).

Checkpoints every 64 tokens (the chunk grid) are saved by the prefill without ending its chunk:
hits on them must give transformers' greedy tokens and the no-cache engine's, with no extra
forward step, and the shared-prompt scenario must skip at least 40% of the prompt tokens.
"""

from __future__ import annotations

import pytest

from deltaserve import LLM, SamplingParams
from helpers_engine import GreedyReference, assert_all_free_after_reset, random_prompts
from helpers_model import make_checkpoint, reference_model

MAX_TOKENS = 4
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("prefix_capture_engine"))


@pytest.fixture(scope="module")
def reference(checkpoint):
    return GreedyReference(reference_model(checkpoint))


@pytest.fixture(scope="module")
def plain(checkpoint):
    return LLM(model=str(checkpoint), dtype="float32", enable_prefix_caching=False, max_num_batched_tokens=512)


def make_llm(checkpoint, **kwargs) -> LLM:
    kwargs.setdefault("checkpoint_interval", 64)
    kwargs.setdefault("max_num_batched_tokens", 512)
    return LLM(model=str(checkpoint), dtype="float32", **kwargs)


def generate(llm: LLM, prompts: list[list[int]]):
    return llm.generate(prompts, GREEDY, use_tqdm=False)


def tokens_of(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


def test_shared_system_prompt_then_burst_then_chat_saves_40_percent(checkpoint, plain):
    """The scenario of a new user: a 300-token system prompt with one request, five more sharing it at
    once, then a two-turn chat on it; the engine default interval (256) and block size (16)."""
    llm = LLM(model=str(checkpoint), dtype="float32")
    (system,) = random_prompts([300], seed=50)
    suffixes = random_prompts([20, 31, 17, 25, 40, 22, 28, 12], seed=51)
    first, burst = [system + suffixes[0]], [system + s for s in suffixes[1:6]]
    steps_before = llm.get_metrics()["num_steps"]
    outputs = generate(llm, first)
    # One prefill step for 320 tokens (the checkpoint at 256 is taken inside it), then decodes.
    assert llm.get_metrics()["num_steps"] - steps_before == MAX_TOKENS
    outputs += generate(llm, burst)
    turn1 = system + suffixes[6]
    (chat1,) = generate(llm, [turn1])
    turn2 = turn1 + chat1.outputs[0].token_ids + suffixes[7]
    (chat2,) = generate(llm, [turn2])
    prompts = first + burst + [turn1, turn2]
    outputs += [chat1, chat2]
    assert tokens_of(outputs) == tokens_of(generate(plain, prompts))
    # Counted: each burst request and turn 1 restore the 256-token checkpoint inside the system
    # prompt; turn 2 restores turn 1's end (its prompt and output but the last output token).
    cached = [o.num_cached_tokens for o in outputs]
    assert cached == [0, 256, 256, 256, 256, 256, 256, len(turn1) + MAX_TOKENS - 1]
    stats = llm.get_metrics()
    assert stats["prompt_tokens"] == sum(map(len, prompts))
    assert stats["prefix_cache_hit_tokens"] == sum(cached)
    assert stats["prompt_tokens_computed"] == stats["prompt_tokens"] - sum(cached)
    assert stats["prefix_cache_miss_tokens"] == stats["prompt_tokens"] - sum(cached)
    assert sum(cached) >= 0.4 * stats["prompt_tokens"]
    assert stats["checkpoints_captured"] >= 1
    assert_all_free_after_reset(llm)


@pytest.fixture(scope="module", params=["kimi_linear", "qwen3_next", "qwen3_5"])
def model_and_reference(request, tmp_path_factory):
    """A tiny KDA (Kimi-Linear) or GDN (Qwen3-Next, Qwen3.5) checkpoint and transformers' greedy reference."""
    path = make_checkpoint(tmp_path_factory.mktemp(f"capture_{request.param}"), arch=request.param)
    return path, GreedyReference(reference_model(path))


def test_hits_inside_a_chunk_at_a_chunk_end_and_off_the_block_grid_match_transformers(model_and_reference):
    # Chunks of at most 128 tokens: a's checkpoint at 64 is taken inside its first chunk, 128 is that
    # chunk's end, 192 is inside the second chunk (which starts at 128).
    checkpoint, reference = model_and_reference
    llm = make_llm(checkpoint, max_num_batched_tokens=128, block_size=16)
    (a,) = random_prompts([200], seed=52)
    x, y, z, w = random_prompts([9, 70, 5, 80], seed=53)
    b = a[:100] + x  # restores a's 64 (mid-chunk)
    c = a[:150] + y  # restores a's 128 (a chunk end); c's own grid then starts at 128: 192
    d = a[:196] + z  # restores a's 192 (mid-chunk, second chunk)
    cases = [(a, 0), (b, 64), (c, 128), (d, 192)]
    outputs = {}
    for prompt, hit in cases:
        (out,) = generate(llm, [prompt])
        outputs[len(outputs)] = out
        assert out.outputs[0].token_ids == reference(prompt, MAX_TOKENS) and out.num_cached_tokens == hit
    # A chat turn on c restores c's end (223 = 220 + 4 - 1: mid-block) and, starting there, takes
    # its checkpoint at 223 + 64 = 287, off the block grid (287 % 16 = 15), where f then hits.
    turn = c + outputs[2].outputs[0].token_ids + w
    f = turn[:290] + z
    for prompt, hit in ((turn, 223), (f, 287)):
        (out,) = generate(llm, [prompt])
        assert out.outputs[0].token_ids == reference(prompt, MAX_TOKENS) and out.num_cached_tokens == hit
    assert_all_free_after_reset(llm)


def test_small_budget_evicts_keeps_within_it_and_tokens_stay_identical(model_and_reference):
    # Room for 3 checkpoints' states and a few blocks; 2 requests at a time, chunks of 128 tokens.
    checkpoint, _ = model_and_reference
    plain = LLM(model=str(checkpoint), dtype="float32", enable_prefix_caching=False, max_num_batched_tokens=512)
    probe = make_llm(checkpoint, max_num_seqs=2).llm_engine.prefix_cache.index
    budget = 3 * probe.slot_bytes + 12 * probe.block_bytes
    llm = make_llm(checkpoint, max_num_seqs=2, max_num_batched_tokens=128, block_size=16,
                   prefix_cache_budget_bytes=budget)
    systems = random_prompts([150, 90, 70], seed=54)
    suffixes = random_prompts([3, 20, 7, 1, 12, 9, 30, 5, 14], seed=55)
    prompts = [systems[i // 3] + suffix for i, suffix in enumerate(suffixes)]
    assert tokens_of(generate(llm, prompts)) == tokens_of(generate(plain, prompts))
    stats = llm.get_metrics()
    assert stats["checkpoints_evicted"] > 0 and stats["prefix_cache_hits"] > 0 and stats["checkpoints_captured"] > 0
    assert stats["prefix_cache_bytes"] <= budget and stats["num_slot_waits"] == 0
    assert_all_free_after_reset(llm)


def test_start_logs_where_checkpoints_are_taken_and_a_bad_interval_is_a_clear_error(checkpoint, caplog):
    with caplog.at_level("INFO", logger="deltaserve.engine.llm_engine"):
        make_llm(checkpoint, prefix_cache_budget_bytes=3 << 20)
    (line,) = [r.getMessage() for r in caplog.records if "prefix caching" in r.getMessage()]
    assert "inside the forward every 64 tokens" in line and "budget 3.0 MiB" in line
    with pytest.raises(ValueError, match="checkpoint_interval = 100 must be a multiple of 64"):
        make_llm(checkpoint, checkpoint_interval=100)
