"""The whole engine on the GDN models (tiny Qwen3-Next, Qwen3.5, Qwen3.5-MoE; float32, CPU): greedy
tokens equal transformers' ``generate`` alone, batched, with chunked prefill, under preemption and on
prefix-cache hits (which also equal misses), and every workload leaves every slot and block free."""

from __future__ import annotations

import pytest
import torch

from deltaserve import LLM, SamplingParams
from helpers_engine import GreedyReference, assert_all_free, assert_all_free_after_reset, random_prompts
from helpers_model import GDN_ARCHS, make_checkpoint, reference_model

MAX_TOKENS = 6
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)


@pytest.fixture(scope="module", params=GDN_ARCHS)
def tiny(request, tmp_path_factory):
    """(checkpoint, transformers' greedy reference) of one GDN family."""
    path = make_checkpoint(tmp_path_factory.mktemp(request.param), arch=request.param)
    return path, GreedyReference(reference_model(path))


def make_llm(checkpoint, dtype: str = "float32", **kwargs) -> LLM:
    kwargs.setdefault("block_size", 4)
    return LLM(model=str(checkpoint), dtype=dtype, **kwargs)


def generate_tokens(llm: LLM, prompts) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]


def test_alone_and_batched_match_transformers(tiny):
    checkpoint, reference = tiny
    llm = make_llm(checkpoint, enable_prefix_caching=False)
    prompts = random_prompts([13, 1, 7, 22, 16], seed=1)
    assert generate_tokens(llm, prompts[:1]) == [reference(prompts[0], MAX_TOKENS)]
    assert generate_tokens(llm, prompts) == [reference(p, MAX_TOKENS) for p in prompts]
    assert_all_free(llm.get_metrics())


def test_chunked_prefill_and_preemption_match_transformers(tiny):
    checkpoint, reference = tiny
    # 7-token chunks; 4 requests of 14 + 6 tokens need 5 blocks each, 10 blocks hold two at a time.
    llm = make_llm(checkpoint, max_num_batched_tokens=7, num_kv_blocks=10, enable_prefix_caching=False)
    prompts = random_prompts([14, 14, 9, 14], seed=2)
    assert generate_tokens(llm, prompts) == [reference(p, MAX_TOKENS) for p in prompts]
    stats = llm.get_metrics()
    assert stats["mixed_steps"] > 0 and stats["num_preemptions"] > 0
    assert_all_free(stats)


def test_prefix_cache_hits_equal_misses_and_transformers(tiny):
    checkpoint, reference = tiny
    (system,) = random_prompts([16], seed=3)
    prompts = [system + suffix for suffix in random_prompts([3, 9, 1, 5], seed=4)]
    # NOTE: checkpoints ending chunks, at a small interval; in-forward ones: test_prefix_capture_engine.py
    cached = make_llm(checkpoint, checkpoint_interval=8, extra={"checkpoints_in_forward": False})
    outputs = generate_tokens(cached, prompts[:1]) + generate_tokens(cached, prompts[1:])
    # a multi-turn chat: the second turn restores the whole first turn from its final checkpoint
    turn = prompts[0] + outputs[0] + random_prompts([4], seed=5)[0]
    outputs += generate_tokens(cached, [turn])
    stats = cached.get_metrics()
    assert stats["prefix_cache_hits"] == 4 and stats["prefix_cache_hit_tokens"] >= 3 * 16
    plain = make_llm(checkpoint, enable_prefix_caching=False)
    assert outputs == generate_tokens(plain, prompts + [turn]) == [reference(p, MAX_TOKENS) for p in prompts + [turn]]
    assert_all_free(plain.get_metrics())
    assert_all_free_after_reset(cached)


def test_recurrent_states_are_float32_by_default_and_bfloat16_on_request(tmp_path):
    checkpoint = make_checkpoint(tmp_path, arch="qwen3_5")
    pool = make_llm(checkpoint, dtype="bfloat16", num_state_slots=2).llm_engine.runner.state_pool
    assert pool.conv["gdn"].dtype == torch.bfloat16 and pool.recurrent["gdn"].dtype == torch.float32
    pool = make_llm(checkpoint, dtype="bfloat16", num_state_slots=2, mamba_ssm_cache_dtype="bfloat16").llm_engine
    assert pool.runner.state_pool.recurrent["gdn"].dtype == torch.bfloat16
    with pytest.raises(ValueError, match="mamba_ssm_cache_dtype must be one of auto, float32, bfloat16, float16"):
        make_llm(checkpoint, mamba_ssm_cache_dtype="int8")
