"""Greedy generation through the whole engine equals transformers' ``generate(do_sample=False)``.

Every workload (single prompt, mixed batch, late arrivals, chunked prefill, slot and KV-block
shortage) must give the reference tokens and leave every slot and block free.
"""

from __future__ import annotations

import pytest

from deltaserve import LLM, SamplingParams
from deltaserve.engine.llm_engine import LLMEngine
from helpers_engine import GreedyReference, assert_all_free, random_prompts
from helpers_model import make_checkpoint, reference_model

GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("engine_greedy"))


@pytest.fixture(scope="module")
def reference(checkpoint):
    return GreedyReference(reference_model(checkpoint))


def make_llm(checkpoint, **kwargs) -> LLM:
    kwargs.setdefault("block_size", 4)
    return LLM(model=str(checkpoint), dtype="float32", **kwargs)


def generate_tokens(llm: LLM, prompts, params=GREEDY) -> list[list[int]]:
    outputs = llm.generate(prompts, params, use_tqdm=False)
    assert [o.prompt_token_ids for o in outputs] == prompts
    assert all(o.finished for o in outputs)
    return [o.outputs[0].token_ids for o in outputs]


def test_single_prompt_matches_transformers(checkpoint, reference):
    llm = make_llm(checkpoint)
    (prompt,) = random_prompts([13], seed=1)
    assert generate_tokens(llm, [prompt]) == [reference(prompt, 10)]
    assert_all_free(llm.get_metrics())


def test_batch_of_different_lengths_matches_transformers(checkpoint, reference):
    llm = make_llm(checkpoint)
    prompts = random_prompts([1, 7, 22, 35, 16], seed=2)
    assert generate_tokens(llm, prompts) == [reference(p, 10) for p in prompts]
    assert_all_free(llm.get_metrics())


def test_requests_added_while_others_decode_match_transformers(checkpoint, reference):
    engine = LLMEngine(model=str(checkpoint), dtype="float32", block_size=4)
    prompts = random_prompts([9, 26, 4, 17], seed=3)
    finished: dict[str, list[int]] = {}

    def step() -> None:
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out.outputs[0].token_ids

    engine.add_request("0", prompts[0], GREEDY)
    for _ in range(3):
        step()
    engine.add_request("1", prompts[1], GREEDY)
    step()
    engine.add_request("2", prompts[2], GREEDY)
    engine.add_request("3", prompts[3], GREEDY)
    assert engine.num_running == 2 and engine.num_waiting == 2
    while engine.has_unfinished_requests():
        step()
    assert [finished[str(i)] for i in range(4)] == [reference(p, 10) for p in prompts]
    assert_all_free(engine.stats())


def test_chunked_prefill_matches_transformers(checkpoint, reference):
    llm = make_llm(checkpoint, max_num_batched_tokens=7)
    prompts = random_prompts([30, 11, 3], seed=4)
    assert generate_tokens(llm, prompts) == [reference(p, 10) for p in prompts]
    stats = llm.get_metrics()
    assert stats["mixed_steps"] > 0  # decodes ran beside prefill chunks
    assert stats["prompt_tokens_computed"] == 44
    assert_all_free(stats)


def test_too_few_state_slots_queues_requests_and_matches_transformers(checkpoint, reference):
    llm = make_llm(checkpoint, num_state_slots=2)
    prompts = random_prompts([5, 12, 8, 20, 3], seed=5)
    assert generate_tokens(llm, prompts) == [reference(p, 10) for p in prompts]
    stats = llm.get_metrics()
    # NOTE: a running request never needs a second slot, so a slot shortage delays admission
    # (counted in num_slot_waits) rather than preempting.
    assert stats["num_slot_waits"] > 0 and stats["state_slots_total"] == 2
    assert_all_free(stats)


def test_too_few_kv_blocks_preempts_and_matches_transformers(checkpoint, reference):
    # 4 requests of 14 + 10 tokens need 6 blocks of 4 each; 12 blocks hold two at a time.
    llm = make_llm(checkpoint, num_kv_blocks=12)
    prompts = random_prompts([14, 14, 14, 14], seed=6)
    assert generate_tokens(llm, prompts) == [reference(p, 10) for p in prompts]
    stats = llm.get_metrics()
    assert stats["num_preemptions"] > 0
    assert stats["prompt_tokens_computed"] > 4 * 14  # generated tokens were recomputed as prompt
    assert_all_free(stats)


def test_preemption_by_recompute_mid_decode_matches_transformers(checkpoint, reference):
    engine = LLMEngine(model=str(checkpoint), dtype="float32", block_size=4)
    prompts = random_prompts([10, 6], seed=7)
    engine.add_request("old", prompts[0], GREEDY)
    engine.add_request("new", prompts[1], GREEDY)
    for _ in range(4):
        engine.step()
    (victim,) = [s for s in engine.scheduler.running if s.request_id == "new"]
    engine.scheduler.preempt(victim)
    finished = {}
    while engine.has_unfinished_requests():
        finished.update({o.request_id: o.outputs[0].token_ids for o in engine.step() if o.finished})
    assert [finished["old"], finished["new"]] == [reference(p, 10) for p in prompts]
    assert engine.stats()["num_preemptions"] == 1
    assert_all_free(engine.stats())


def test_n_greedy_sequences_each_match_transformers(checkpoint, reference):
    llm = make_llm(checkpoint)
    (prompt,) = random_prompts([8], seed=8)
    (out,) = llm.generate([prompt], SamplingParams(n=3, temperature=0, max_tokens=10, ignore_eos=True), use_tqdm=False)
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert [c.token_ids for c in out.outputs] == [reference(prompt, 10)] * 3
    assert_all_free(llm.get_metrics())
