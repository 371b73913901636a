"""Prefix caching through the whole engine (tiny Kimi-Linear, float32, CPU), checkpoints ending chunks.

These run the fallback where checkpoints end prefill chunks (``checkpoints_in_forward`` off), at
small intervals; ``test_prefix_capture_engine.py`` covers checkpoints taken inside the forward.
A hit must give the greedy tokens of transformers and of the same engine without the cache, skip
exactly the restored prompt tokens, leave cached checkpoints bit-identical while other requests
run, and give every slot and block back on ``reset_prefix_cache()``.
"""

from __future__ import annotations

import pytest
import torch

from deltaserve import LLM, SamplingParams
from helpers_engine import GreedyReference, assert_all_free_after_reset, random_prompts
from helpers_model import make_checkpoint, reference_model

MAX_TOKENS = 6
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("prefix_cache_engine"))


@pytest.fixture(scope="module")
def reference(checkpoint):
    return GreedyReference(reference_model(checkpoint))


@pytest.fixture(scope="module")
def plain(checkpoint):
    """The same engine without a prefix cache: every prompt computed in full."""
    return make_llm(checkpoint, enable_prefix_caching=False)


def make_llm(checkpoint, **kwargs) -> LLM:
    kwargs.setdefault("block_size", 4)
    kwargs.setdefault("checkpoint_interval", 8)
    kwargs.setdefault("extra", {"checkpoints_in_forward": False})
    return LLM(model=str(checkpoint), dtype="float32", **kwargs)


def generate_tokens(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]


def test_shared_system_prompt_matches_transformers_and_skips_the_shared_tokens(checkpoint, reference):
    (system,) = random_prompts([32], seed=30)
    prompts = [system + suffix for suffix in random_prompts([3, 9, 1, 6, 12], seed=31)]
    llm = make_llm(checkpoint)
    outputs = generate_tokens(llm, prompts[:1]) + generate_tokens(llm, prompts[1:])
    assert outputs == [reference(p, MAX_TOKENS) for p in prompts]
    stats = llm.get_metrics()
    # The first request leaves checkpoints every 8 tokens: the other four restore all 32 shared tokens.
    assert (stats["prefix_cache_queries"], stats["prefix_cache_hits"], stats["prefix_cache_hit_tokens"]) == (5, 4, 128)
    assert stats["prompt_tokens"] == sum(map(len, prompts))
    assert stats["prompt_tokens_computed"] == stats["prompt_tokens"] - 4 * 32
    assert_all_free_after_reset(llm)


def test_multi_turn_chat_restores_everything_but_the_last_output_token(checkpoint, plain, reference):
    llm = make_llm(checkpoint)
    (prompt,) = random_prompts([10], seed=32)
    expected_hit_tokens, previous = 0, None
    for turn in range(4):
        (ours,) = generate_tokens(llm, [prompt])
        assert [ours] == generate_tokens(plain, [prompt])
        if previous is not None:
            # The state after the previous turn's prompt + output (its last token never ran).
            expected_hit_tokens += previous - 1
        previous = len(prompt) + len(ours)
        prompt = prompt + ours + random_prompts([3 + turn], seed=40 + turn)[0]
    assert generate_tokens(llm, [prompt]) == [reference(prompt, MAX_TOKENS)]
    expected_hit_tokens += previous - 1
    stats = llm.get_metrics()
    assert stats["prefix_cache_hit_tokens"] == expected_hit_tokens
    assert stats["prompt_tokens_computed"] == stats["prompt_tokens"] - expected_hit_tokens
    assert_all_free_after_reset(llm)


def test_prompts_diverging_mid_block_and_mid_interval_match_transformers(checkpoint, reference):
    llm = make_llm(checkpoint)
    (a,) = random_prompts([21], seed=33)
    x, y, z = random_prompts([5, 4, 3], seed=34)
    b = a[:13] + x  # leaves a at 13: mid-block (13 % 4 = 1), mid-interval (13 % 8 = 5)
    c = b + y  # extends b's whole prompt (18 tokens: 18 % 4 = 2)
    d = a[:13] + z
    hits = []
    for prompt in (a, b, c, d):
        before = llm.get_metrics()["prefix_cache_hit_tokens"]
        assert generate_tokens(llm, [prompt]) == [reference(prompt, MAX_TOKENS)]
        hits.append(llm.get_metrics()["prefix_cache_hit_tokens"] - before)
    # b: a's checkpoint at 8 (interval); b checkpoints 12, where it leaves a's blocks, and 18 (its
    # prompt's end, a partly filled block); c restores those 18; d restores b's 12.
    assert hits == [0, 8, 18, 12]
    assert_all_free_after_reset(llm)


def test_small_pools_force_eviction_and_tokens_stay_identical(checkpoint, plain):
    # 6 checkpoint slots, 14 KV blocks of 4 tokens: two running requests of up to 35 tokens overflow it.
    llm = make_llm(checkpoint, max_num_seqs=2, num_state_slots=8, num_kv_blocks=14, max_model_len=56,
                   max_num_batched_tokens=16)
    systems = random_prompts([17, 11, 23], seed=35)
    suffixes = random_prompts([2, 5, 1, 7, 3, 4, 6, 2, 9, 4, 3, 5], seed=36)
    prompts = [systems[(i // 3) % 3] + suffix for i, suffix in enumerate(suffixes)]
    assert generate_tokens(llm, prompts) == generate_tokens(plain, prompts)
    stats = llm.get_metrics()
    assert stats["checkpoints_evicted"] > 0 and stats["prefix_cache_hits"] > 0 and stats["num_preemptions"] > 0
    assert stats["prefix_cache_bytes"] <= stats["prefix_cache_budget_bytes"]
    assert_all_free_after_reset(llm)


def test_cached_checkpoints_are_never_written_by_running_requests(checkpoint, plain):
    llm = make_llm(checkpoint)
    engine, (system,) = llm.llm_engine, random_prompts([26], seed=37)
    first = [system + s for s in random_prompts([3, 5], seed=38)]
    generate_tokens(llm, first)
    entries = engine.prefix_cache.index.entries()
    pool, kv, bs = engine.runner.state_pool, engine.runner.kv_cache, engine.config.block_size

    def snapshot(entry) -> list[torch.Tensor]:
        states = [pool.conv["kda"][:, entry.slot].clone(), pool.recurrent["kda"][:, entry.slot].clone()]
        rows = [kv[:, b, : min(bs, entry.num_tokens - i * bs)].clone() for i, b in enumerate(entry.block_ids)]
        return states + rows

    before = {id(e): snapshot(e) for e in entries}
    # Hits on those entries (shared and copied blocks), misses, and a chat continuing one of them.
    others = [system + s for s in random_prompts([4, 1, 9], seed=39)] + random_prompts([30, 7], seed=40)
    others.append(first[0] + generate_tokens(plain, first[:1])[0] + [5, 6, 7])
    assert generate_tokens(llm, others) == generate_tokens(plain, others)
    assert llm.get_metrics()["prefix_cache_hits"] >= 4
    for entry in entries:
        assert entry in engine.prefix_cache.index  # nothing was evicted
        assert all(torch.equal(x, y) for x, y in zip(snapshot(entry), before[id(entry)]))


def test_prefix_caching_off_keeps_nothing(checkpoint, plain):
    (system,) = random_prompts([20], seed=41)
    generate_tokens(plain, [system + [1], system + [2]])
    stats = plain.get_metrics()
    assert stats["prefix_cache_hit_tokens"] == 0 and stats["checkpoints_stored"] == 0
    assert stats["state_slots_cached"] == 0 and stats["kv_blocks_cached"] == 0


def test_pool_gets_checkpoint_slots_and_a_budget_by_default(checkpoint):
    on = make_llm(checkpoint, max_num_seqs=3).llm_engine.config
    off = make_llm(checkpoint, max_num_seqs=3, enable_prefix_caching=False).llm_engine.config
    assert (on.num_state_slots, off.num_state_slots) == (6, 3)
    engine = make_llm(checkpoint, max_num_seqs=3).llm_engine
    slot_bytes = engine.prefix_cache.index.slot_bytes
    assert on.prefix_cache_budget_bytes >= 3 * slot_bytes
    small = make_llm(checkpoint, max_num_seqs=3, prefix_cache_budget_bytes=slot_bytes + 1).llm_engine.config
    assert small.num_state_slots == 4


def test_bench_shared_prefix_reports_hits_and_ttft_with_and_without_the_cache(checkpoint, capsys):
    from deltaserve.cli import main

    argv = ["--num-requests", "6", "--system-prompt-len", "70", "--min-input", "4", "--max-input", "8",
            "--min-output", "2", "--max-output", "3", "--num-conversations", "2", "--num-turns", "3",
            "--block-size", "4", "--checkpoint-interval", "64", "--max-num-seqs", "2"]
    assert main(["bench", "--model", str(checkpoint), "--dtype", "float32", "--workload", "shared-prefix", *argv]) == 0
    out = capsys.readouterr().out
    rows = {(r[0], r[1]): r[2:] for r in (line.replace("system prompt", "system").split() for line in out.splitlines())
            if len(r) == 11 and r[1] in ("on", "off")}
    assert set(rows) == {("system", "off"), ("system", "on"), ("chat", "off"), ("chat", "on")}
    for part, requests in (("system", "6"), ("chat", "6")):
        off, on = rows[part, "off"], rows[part, "on"]
        assert off[0] == on[0] == requests and off[1] == on[1]  # same requests and prompt tokens
        assert off[2] == off[1] and off[3] == "0.0%" and off[4] == "0"
        assert int(on[2]) < int(on[1]) and int(on[4]) == int(off[2]) - int(on[2]) > 0
