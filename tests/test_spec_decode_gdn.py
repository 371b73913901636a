"""Speculative decoding on the GDN models (tiny Qwen3-Next, Qwen3.5, Qwen3.5-MoE; float32, CPU): greedy
tokens with n-gram and with accepted/rejected/absent drafts equal transformers' ``generate``, with
chunked prefill, preemption, prefix-cache hits on checkpoints left by speculative requests, and ``n > 1``."""

from __future__ import annotations

import pytest

from deltaserve import SamplingParams
from helpers_engine import GreedyReference, assert_all_free, random_prompts
from helpers_model import GDN_ARCHS, make_checkpoint, reference_model
from helpers_spec import NGRAM, OracleProposer, oracle_config, spec_llm

MAX_TOKENS = 10
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)


@pytest.fixture(scope="module", params=GDN_ARCHS)
def tiny(request, tmp_path_factory):
    path = make_checkpoint(tmp_path_factory.mktemp(request.param), arch=request.param)
    return path, GreedyReference(reference_model(path))


def tokens_of(llm, prompts, params=GREEDY):
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


def test_ngram_and_oracle_drafts_with_chunked_prefill_and_preemption(tiny):
    checkpoint, reference = tiny
    repetitive = [[5, 6, 7, 8] * 4, [30, 31] * 6]
    llm = spec_llm(checkpoint, NGRAM)
    assert tokens_of(llm, repetitive) == [reference(p, MAX_TOKENS) for p in repetitive]
    assert llm.get_metrics()["spec_decode_num_draft_tokens"] > 0

    prompts = random_prompts([14, 14, 9, 14], seed=2)
    sequences = [p + reference(p, MAX_TOKENS) for p in prompts]
    llm = spec_llm(checkpoint, oracle_config(), proposer=OracleProposer(sequences),
                   max_num_batched_tokens=7, num_kv_blocks=10, enable_prefix_caching=False)  # fmt: skip
    assert tokens_of(llm, prompts) == [reference(p, MAX_TOKENS) for p in prompts]
    stats = llm.get_metrics()
    assert stats["mixed_steps"] > 0 and stats["num_preemptions"] > 0
    assert stats["spec_decode_num_draft_tokens"] > stats["spec_decode_num_accepted_tokens"] > 0
    assert_all_free(stats)


def test_prefix_cache_hits_and_n_sequences_with_drafts(tiny):
    checkpoint, reference = tiny
    (first,) = random_prompts([9], seed=3)
    second = first + reference(first, MAX_TOKENS) + [1, 2]  # hits the checkpoint the first left at release
    sequences = [p + reference(p, MAX_TOKENS) for p in (first, second)]
    llm = spec_llm(checkpoint, oracle_config(), proposer=OracleProposer(sequences))
    n_params = SamplingParams(n=2, temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    (out,) = llm.generate([first], n_params, use_tqdm=False)
    assert [c.token_ids for c in out.outputs] == [reference(first, MAX_TOKENS)] * 2
    assert tokens_of(llm, [second]) == [reference(second, MAX_TOKENS)]
    stats = llm.get_metrics()
    assert stats["prefix_cache_hits"] >= 1 and stats["prefix_cache_hit_tokens"] >= len(first) + MAX_TOKENS - 1
    assert stats["spec_decode_num_accepted_tokens"] > 0
