"""Verify-step graphs' padded static buffers (run eagerly on the CPU) give the eager verify path's tokens and states.

On CUDA the verify forward and its commit are captured per padded batch size (``tokens_per_seq = 1 + k``);
here ``use_graphs=False`` runs the same padded forward and device-side commit eagerly, so the padding
rules (rows at ``1 + k`` strides, filler tokens after a row with fewer drafts, padded rows on the null
slot, the commit's dropped tokens into slot 0) are checked without a GPU: in lock-step with an engine
on the eager verify path (same drafts), the states and KV cache agree after every step, and the greedy
tokens equal those of decoding without speculation.
"""

from __future__ import annotations

import json
import random

import pytest
import torch
from conftest import rel_err
from helpers_engine import assert_all_free, random_prompts
from helpers_model import make_checkpoint
from helpers_spec import NGRAM, OracleProposer, oracle_config, spec_llm

from deltaserve import LLM, SamplingParams
from deltaserve.engine.cuda_graph import DecodeGraphs

K = 3
BOUND = 1e-5


@pytest.fixture(scope="module", params=["kimi_linear", "qwen3_next"])
def checkpoint(request, tmp_path_factory):
    """Both delta-rule kinds and both attention kinds (KDA + MLA; GDN + gated GQA)."""
    return make_checkpoint(tmp_path_factory.mktemp("verify_graphs"), arch=request.param)


class Recorder:
    """Wraps a graphs object's ``run``: which batches it took (sequences, padded size, query lengths)."""

    def __init__(self, graphs: DecodeGraphs):
        self.graphs, self.calls = graphs, []
        run = graphs.run

        def recording_run(input_ids, positions, ctx, *args):
            self.calls.append((ctx.num_seqs, graphs.padded_size(ctx.num_seqs), list(ctx.query_lens)))
            return run(input_ids, positions, ctx, *args)

        graphs.run = recording_run


def install_padded_graphs(llm: LLM, max_num_seqs: int) -> tuple[Recorder, Recorder]:
    """The CUDA runner's decode and verify graphs, eager (``use_graphs=False``), on a CPU engine."""
    runner = llm.llm_engine.runner

    def graphs(tokens_per_seq: int) -> DecodeGraphs:
        return DecodeGraphs(
            runner.model, max_num_seqs=max_num_seqs, max_model_len=runner.config.max_model_len,
            block_size=runner.config.block_size, device=runner.device, use_graphs=False, tokens_per_seq=tokens_per_seq,
        )  # fmt: skip

    runner.cuda_graphs, runner.verify_graphs = graphs(1), graphs(1 + K)
    return Recorder(runner.cuda_graphs), Recorder(runner.verify_graphs)


def assert_same_caches(a: LLM, b: LLM, bound: float = BOUND) -> None:
    """Every slot but the null slot 0 (padding writes there) and the whole KV cache agree."""
    ra, rb = a.llm_engine.runner, b.llm_engine.runner
    for name in ra.state_pool.conv:
        for kind in ("conv", "recurrent"):
            x, y = getattr(ra.state_pool, kind)[name], getattr(rb.state_pool, kind)[name]
            if x is not None:
                assert rel_err(x[:, 1:], y[:, 1:]) < bound, f"{kind} states of {name}"
    assert rel_err(ra.kv_cache, rb.kv_cache) < bound


def lockstep(eager: LLM, padded: LLM, prompts, params, arrivals: dict[int, int] | None = None,
             bound: float = BOUND, exact: bool = True) -> list[list[list[int]]]:  # fmt: skip
    """Both engines step by step on the same requests (request ``i`` added before step ``arrivals.get(i, 0)``),
    caches compared after each step (relative error below ``bound``); each engine's tokens per request.

    ``exact=False`` (the GPU, where rounding may break a near-tie differently): caches are compared only
    while the two engines' tokens agree, and the tokens may differ.
    """
    tokens: list[dict] = [{}, {}]
    arrivals = arrivals or {}
    step = 0
    while step == 0 or eager.llm_engine.has_unfinished_requests() or padded.llm_engine.has_unfinished_requests():
        for out, llm in zip(tokens, (eager, padded)):
            for i, (prompt, p) in enumerate(zip(prompts, params)):
                if arrivals.get(i, 0) == step:
                    llm.llm_engine.add_request(str(i), prompt, p)
            for o in llm.llm_engine.step():
                out[o.request_id] = list(o.outputs[0].token_ids)
        if exact or tokens[0] == tokens[1]:
            assert_same_caches(eager, padded, bound)
        step += 1
    if exact:
        assert tokens[0] == tokens[1]
    return [[out[str(i)] for i in range(len(prompts))] for out in tokens]


def count_verify_steps(llm: LLM) -> list[int]:
    """A counter of the runner's forwards with verify rows (graph or eager), one entry per step."""
    runner, steps = llm.llm_engine.runner, []
    execute = runner.execute

    def counting_execute(inputs, *args, **kwargs):
        if inputs.num_verify_seqs:
            steps.append(inputs.num_verify_seqs)
        return execute(inputs, *args, **kwargs)

    runner.execute = counting_execute
    return steps


def plain_tokens(checkpoint, prompts, params) -> list[list[int]]:
    llm = LLM(model=str(checkpoint), dtype="float32", block_size=4)
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


def greedy(lengths: list[int]) -> list[SamplingParams]:
    return [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in lengths]


def test_padded_verify_with_short_and_absent_drafts_matches_eager_verify_and_no_speculation(checkpoint):
    # Four sequences, rows finishing at different lengths (4 -> 3 rows: a size-4 graph padded -> 2 -> 1); the
    # oracle's wrong drafts cut a step's drafts short (1 or 2 of 3: filler-padded rows) and skipped
    # steps leave a row without drafts (a decode row in the verify graph). A late arrival's prefill
    # beside verify rows falls back to the eager verify path.
    prompts = random_prompts([6, 13, 9, 4], seed=5)
    params = greedy([14, 9, 5, 12])
    expected = plain_tokens(checkpoint, prompts, params)
    sequences = [p + t for p, t in zip(prompts, expected)]

    def oracle() -> OracleProposer:
        return OracleProposer(sequences, skip_rate=0.3, seed=3)

    eager = spec_llm(checkpoint, oracle_config(K), proposer=oracle(), max_num_seqs=4)
    padded = spec_llm(checkpoint, oracle_config(K), proposer=oracle(), max_num_seqs=4)
    decode, verify = install_padded_graphs(padded, max_num_seqs=4)
    verify_steps = count_verify_steps(padded)
    assert lockstep(eager, padded, prompts, params, arrivals={3: 2})[1] == expected
    assert any(padded_size > n for n, padded_size, _ in verify.calls), verify.calls
    assert any(1 < min(lens) < 1 + K for _, _, lens in verify.calls), "no row with fewer drafts was padded"
    assert any(min(lens) == 1 for _, _, lens in verify.calls), verify.calls
    assert any(max(lens) == 1 + K for _, _, lens in verify.calls)
    assert decode.calls, "no decode step took the decode graph"
    assert len(verify_steps) > len(verify.calls), "no verify step fell back to eager"
    stats = padded.get_metrics()
    assert stats["spec_decode_num_draft_tokens"] > stats["spec_decode_num_accepted_tokens"] > 0
    assert_all_free(stats)


def test_padded_verify_with_ngram_drafts_matches_no_speculation(checkpoint):
    # Prompts holding every token of the vocabulary: prompt lookup always finds the last token, so every
    # row drafts each step, k tokens or fewer (when the match lies near the end).
    vocab = json.loads((checkpoint / "config.json").read_text())["vocab_size"]
    prompts = []
    for seed in range(3):
        tokens = list(range(vocab))
        random.Random(seed).shuffle(tokens)
        prompts.append(tokens)
    params = greedy([12, 10, 7])
    expected = plain_tokens(checkpoint, prompts, params)
    eager = spec_llm(checkpoint, NGRAM, max_num_seqs=4)
    padded = spec_llm(checkpoint, NGRAM, max_num_seqs=4)
    decode, verify = install_padded_graphs(padded, max_num_seqs=4)
    assert lockstep(eager, padded, prompts, params)[1] == expected
    assert any(padded_size > n for n, padded_size, _ in verify.calls), verify.calls
    assert any(min(lens) < 1 + K for _, _, lens in verify.calls), verify.calls
    assert_all_free(padded.get_metrics())


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_padded_verify_with_synthetic_drafts_matches_eager_verify(checkpoint, async_scheduling):
    # Forced acceptance (2.4 of 4 tokens per step): rows accept 1, 2 or 3 drafts (tokens then follow the forced
    # drafts, not greedy); rows near max_tokens draft fewer or none. Every verify step takes the graph. With
    # async scheduling (the GPU default) both engines launch each step with a token patch.
    config = {"method": "synthetic", "num_speculative_tokens": K, "synthetic_acceptance_length": 2.4,
              "auto_disable": False}  # fmt: skip
    prompts = random_prompts([5, 8, 11, 4, 7], seed=6)
    params = greedy([11, 6, 9, 3, 8])
    eager = spec_llm(checkpoint, config, max_num_seqs=8, async_scheduling=async_scheduling)
    padded = spec_llm(checkpoint, config, max_num_seqs=8, async_scheduling=async_scheduling)
    assert (padded.llm_engine.async_scheduler is not None) == async_scheduling
    decode, verify = install_padded_graphs(padded, max_num_seqs=8)
    verify_steps = count_verify_steps(padded)
    lockstep(eager, padded, prompts, params)
    stats = padded.get_metrics()
    assert stats["spec_decode_num_accepted_tokens"] > 0
    assert len(verify.calls) == len(verify_steps) > 0
    assert any(padded_size > n for n, padded_size, _ in verify.calls), verify.calls
    assert_all_free(stats)


def test_verify_graphs_take_only_batches_whose_every_row_verifies(checkpoint):
    llm = spec_llm(checkpoint, oracle_config(K), max_num_seqs=4)
    _, verify = install_padded_graphs(llm, max_num_seqs=4)
    graphs = verify.graphs
    from deltaserve.forward_context import make_forward_context

    def ctx(query_lens, computed):
        tables = [[0, 1, 2, 3]] * len(query_lens)
        return make_forward_context(query_lens, computed, [1] * len(query_lens), block_tables=tables, block_size=4)

    assert graphs.can_run(ctx([4, 2], [5, 6]), num_sampled=0, num_verify=2)
    assert graphs.can_run(ctx([4, 1], [5, 6]), num_sampled=1, num_verify=1)  # a decode row after the verify rows
    assert not graphs.can_run(ctx([4, 1], [5, 6]), num_sampled=2, num_verify=0)  # no verify row: decode graphs
    assert not graphs.can_run(ctx([4, 9], [5, 6]), num_sampled=1, num_verify=1)  # a prefill chunk
    assert not graphs.can_run(ctx([4, 5], [5, 6]), num_sampled=0, num_verify=2)  # more than k drafts
    assert not graphs.can_run(ctx([4, 4], [5, 0]), num_sampled=0, num_verify=2)  # not a continuation
    assert not graphs.can_run(ctx([4] * 5, [5] * 5), num_sampled=0, num_verify=5)  # beyond the largest size
    with pytest.raises(ValueError, match=r"num_accepted_tokens\[1\] = 3 must be in 0..2"):
        graphs.run(torch.zeros(6, dtype=torch.int64), torch.tensor([5, 6, 7, 8, 6, 7]), ctx([4, 2], [5, 6]), 2)
        graphs.pending.commit([1, 3])
