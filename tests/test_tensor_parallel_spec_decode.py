"""Speculative decoding under TP 2 (gloo, real workers): verify rows run on every rank and the accepted
tokens are committed on every rank (a cache op), so greedy tokens equal a TP-1 engine without drafts."""

from __future__ import annotations

import pytest

from deltaserve import LLM
from helpers_spec import OracleProposer, oracle_config
from helpers_tp import ENGINE, SCENARIOS, greedy, make_tp_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_tp_checkpoint(tmp_path_factory.mktemp("tp-spec"))


@pytest.mark.parametrize("name", ["batched", "preempted"])
def test_tp2_with_drafts_matches_tp1_without(checkpoint, name):
    prompts, n = SCENARIOS[name]
    plain = LLM(str(checkpoint), **ENGINE)
    want = [o.outputs[0].token_ids for o in plain.generate(prompts, greedy(n), use_tqdm=False)]
    llm = LLM(str(checkpoint), tensor_parallel_size=2, speculative_config=oracle_config(), **ENGINE)
    try:
        # NOTE: drafts are proposed on rank 0 only; the workers get them as the verify rows' input ids.
        llm.llm_engine.runner.speculator.proposer = OracleProposer([p + w for p, w in zip(prompts, want)], seed=3)
        got = [o.outputs[0].token_ids for o in llm.generate(prompts, greedy(n), use_tqdm=False)]
        stats = llm.get_metrics()
    finally:
        llm.shutdown()
    assert got == want
    # Drafts were verified, some accepted and some rejected (a worker that skipped the commit diverges).
    assert stats["spec_decode_num_draft_tokens"] > stats["spec_decode_num_accepted_tokens"] > 0, stats
