"""``LLMEngine.warmup``: one discarded prefill + decode that leaves no trace in counters, pools or outputs."""

from __future__ import annotations

import pytest

from deltaserve import SamplingParams
from deltaserve.engine.llm_engine import LLMEngine
from helpers_engine import GreedyReference, assert_all_free, random_prompts
from helpers_model import make_checkpoint, reference_model

GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("engine_warmup"))


def test_warmup_runs_the_model_then_leaves_counters_and_pools_clean(checkpoint):
    engine = LLMEngine(model=str(checkpoint), dtype="float32", block_size=4, max_num_batched_tokens=64,
                       extra={"warmup": True})
    # The freed slot keeps what the warm-up prefill wrote: it ran through the model.
    assert float(engine.runner.state_pool.recurrent["kda"].abs().sum()) > 0
    stats = engine.stats()
    assert stats["prompt_tokens"] == 0 and stats["generation_tokens"] == 0 and stats["prefix_cache_queries"] == 0
    assert_all_free(stats)


def test_requests_after_warmup_match_transformers(checkpoint):
    engine = LLMEngine(model=str(checkpoint), dtype="float32", block_size=4, max_num_batched_tokens=64,
                       extra={"warmup": True})
    reference = GreedyReference(reference_model(checkpoint))
    prompts = random_prompts([5, 19], seed=11)
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, GREEDY)
    finished = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out.outputs[0].token_ids
    assert [finished[str(i)] for i in range(2)] == [reference(p, 6) for p in prompts]


def test_warmup_refuses_a_busy_engine(checkpoint):
    engine = LLMEngine(model=str(checkpoint), dtype="float32", block_size=4)
    engine.add_request("a", [1, 2, 3], GREEDY)
    with pytest.raises(ValueError, match="idle engine"):
        engine.warmup()


def test_warmup_covers_each_batch_shape_class(checkpoint):
    # Each class compiles its own kernel specialisations on the GPU: a fresh full-budget prefill, a
    # continuation (initial states) batched with fresh prompts, a prompt joining decodes, decode batches.
    engine = LLMEngine(model=str(checkpoint), dtype="float32", block_size=4, max_num_batched_tokens=64,
                       extra={"warmup": False})
    batches = []
    schedule = engine.scheduler.schedule

    def recording_schedule():
        batch = schedule()
        batches.append([(seq.num_computed_tokens, n, seq.is_prefill) for seq, n in zip(batch.seqs, batch.num_new_tokens)])
        return batch

    engine.scheduler.schedule = recording_schedule
    engine.warmup()
    assert batches[0] == [(0, 64, True)]
    continuation_with_fresh = [b for b in batches if any(c > 0 and p for c, _, p in b) and any(c == 0 for c, _, _ in b)]
    assert continuation_with_fresh
    assert any(any(n > 1 for _, n, _ in b) and any(n == 1 and not p for _, n, p in b) for b in batches)
    assert any(len(b) > 1 and all(n == 1 for _, n, _ in b) for b in batches)
    assert_all_free(engine.stats())


def test_warmup_takes_and_hits_in_forward_checkpoints_then_empties_the_cache(checkpoint):
    # On the GPU a prefill with checkpoints and a prefill from a restored state have kernel
    # specialisations of their own: the warm-up runs both, then leaves the cache empty.
    engine = LLMEngine(model=str(checkpoint), dtype="float32", block_size=4, max_num_batched_tokens=256,
                       checkpoint_interval=64, extra={"warmup": False})
    seen = {}
    reset = engine.prefix_cache.reset

    def recording_reset() -> None:
        seen.update(engine.prefix_cache.stats())
        reset()

    engine.prefix_cache.reset = recording_reset
    engine.warmup()
    assert seen["checkpoints_captured"] > 0 and seen["prefix_cache_hits"] >= 1
    stats = engine.stats()
    assert stats["prefix_cache_queries"] == 0 and stats["checkpoints_captured"] == 0
    assert stats["prefix_cache_checkpoints"] == 0 and stats["prefix_cache_bytes"] == 0
    assert_all_free(stats)


def test_warmup_fills_the_budget_with_several_prompts_when_max_model_len_is_short(checkpoint):
    # A budget larger than max_model_len (bench_e2e: 16,384 tokens, 2,016 per sequence): the first
    # step must still be a full budget of fresh prompts, and one step holds sixteen fresh prompts.
    engine = LLMEngine(model=str(checkpoint), dtype="float32", block_size=4, max_num_batched_tokens=1024,
                       max_model_len=200, max_num_seqs=32, extra={"warmup": False})
    batches = []
    schedule = engine.scheduler.schedule

    def recording_schedule():
        batch = schedule()
        batches.append([(seq.num_computed_tokens, n) for seq, n in zip(batch.seqs, batch.num_new_tokens)])
        return batch

    engine.scheduler.schedule = recording_schedule
    engine.warmup()
    first = batches[0]
    assert sum(n for _, n in first) == 1024 and len(first) > 1 and all(c == 0 for c, _ in first)
    assert any(sum(1 for c, n in b if c == 0 and n == 37) == 16 for b in batches)
    assert_all_free(engine.stats())
