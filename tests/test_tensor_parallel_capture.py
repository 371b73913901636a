"""Prefix-cache checkpoints captured inside the forward (at multiples of the 64-token chunk) under TP 2:
every rank's layers save their own heads' states into the slots rank 0 chose (they come with the step
broadcast), so the next requests hit and produce TP 1's tokens and logits."""

from __future__ import annotations

import pytest

from deltaserve import LLM
from helpers_tp import (
    _prompts, assert_checkpoints_sharded, assert_same_run, greedy, make_tp_checkpoint, tapped,
)  # fmt: skip

# NOTE: checkpoints every 64 tokens (the capture grid), so a 150-token shared prefix is captured twice.
ENGINE = dict(max_num_seqs=4, max_num_batched_tokens=256, block_size=16, num_kv_blocks=64, checkpoint_interval=64, seed=0)
SHARED = _prompts([150], 8)[0]
PROMPTS = [SHARED + tail for tail in _prompts([5, 9, 7], 9)]


def run(llm: LLM) -> dict:
    llm.llm_engine.runner.sampler.logits.clear()
    tokens = [o.outputs[0].token_ids for o in llm.generate(PROMPTS[:1], greedy(4), use_tqdm=False)]
    tokens += [o.outputs[0].token_ids for o in llm.generate(PROMPTS[1:], greedy(4), use_tqdm=False)]
    stats = llm.get_metrics()
    return {"tokens": tokens, "logits": list(llm.llm_engine.runner.sampler.logits), **stats}


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    path = make_tp_checkpoint(tmp_path_factory.mktemp("tp-capture"))
    reference = tapped(LLM(str(path), **ENGINE))
    llm = tapped(LLM(str(path), tensor_parallel_size=2, **ENGINE))
    yield llm, reference
    llm.shutdown()


def test_in_forward_checkpoints_hit_with_tp1_tokens_and_logits(engines):
    llm, reference = engines
    got, want = run(llm), run(reference)
    assert got["checkpoints_captured"] > 0 and got["checkpoints_captured"] == want["checkpoints_captured"]
    assert got["prefix_cache_hits"] >= 2 and got["prefix_cache_hits"] == want["prefix_cache_hits"]
    assert_same_run({**got, "num_preemptions": 0}, {**want, "num_preemptions": 0}, "captured")
    assert_checkpoints_sharded(llm, reference, "kda")
