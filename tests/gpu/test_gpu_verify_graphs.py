"""Speculative verify steps in CUDA graphs: the captured padded verify forward and its captured commit give
the eager verify path's states and tokens, and the greedy tokens of decoding without speculation (fp32,
the tiny Kimi-Linear and Qwen3-Next models; short, absent and full drafts; padded batch sizes)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

from helpers_engine import assert_all_free, random_prompts  # noqa: E402
from helpers_model import make_checkpoint  # noqa: E402
from helpers_spec import OracleProposer, oracle_config, spec_llm  # noqa: E402
from test_verify_graph_buffers import K, Recorder, count_verify_steps, greedy, lockstep  # noqa: E402

from deltaserve import LLM, SamplingParams  # noqa: E402

# NOTE: a decode row beside verify rows runs fla's chunked kernel (tf32 tiles) in the eager verify forward and
# the fp32 recurrent kernel in the graph; the two forwards' GEMMs also see different token counts (padding).
BOUND = 3e-3
TIE_MARGIN = 1e-3


@pytest.fixture(scope="module", params=["kimi_linear", "qwen3_next"])
def checkpoint(request, tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("verify_graphs_gpu"), arch=request.param)


def trusted_prefix(completion) -> int:
    """Steps before the first near-tie of the top-2 logprobs (where fp32 rounding may pick either)."""
    for i, entry in enumerate(completion.logprobs):
        best = sorted(lp.logprob for lp in entry.values())
        if len(best) > 1 and best[-1] - best[-2] < TIE_MARGIN:
            return i
    return len(completion.token_ids)


def test_gpu_verify_graphs_are_captured_once_per_size_and_not_when_eager(checkpoint):
    llm = spec_llm(checkpoint, oracle_config(K), device="cuda", max_num_seqs=8)
    runner = llm.llm_engine.runner
    graphs = runner.verify_graphs
    assert graphs is not None and graphs.tokens_per_seq == 1 + K
    assert sorted(graphs.graphs) == sorted(graphs.commit_graphs) == [1, 2, 4, 8]
    assert sorted(runner.cuda_graphs.graphs) == [1, 2, 4, 8]
    eager = spec_llm(checkpoint, oracle_config(K), device="cuda", max_num_seqs=8, extra={"enforce_eager": True})
    assert eager.llm_engine.runner.verify_graphs is None and eager.llm_engine.runner.cuda_graphs is None
    limited = spec_llm(checkpoint, {**oracle_config(K), "disable_by_batch_size": 2}, device="cuda", max_num_seqs=8)
    assert sorted(limited.llm_engine.runner.verify_graphs.graphs) == [1, 2]


def test_gpu_graph_verify_equals_eager_verify_and_no_speculation(checkpoint):
    prompts = random_prompts([6, 13, 9, 4, 21], seed=5)
    lengths = [14, 9, 5, 12, 16]
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, logprobs=2) for n in lengths]
    plain = LLM(model=str(checkpoint), dtype="float32", device="cuda", block_size=4, max_num_seqs=8)
    expected = [o.outputs[0] for o in plain.generate(prompts, params, use_tqdm=False)]
    sequences = [p + o.token_ids for p, o in zip(prompts, expected)]

    def oracle() -> OracleProposer:
        return OracleProposer(sequences, skip_rate=0.3, seed=3)

    graph = spec_llm(checkpoint, oracle_config(K), proposer=oracle(), device="cuda", max_num_seqs=8)
    eager = spec_llm(checkpoint, oracle_config(K), proposer=oracle(), device="cuda", max_num_seqs=8)
    eager.llm_engine.runner.verify_graphs = None  # decode steps keep their graphs
    verify = Recorder(graph.llm_engine.runner.verify_graphs)
    verify_steps = count_verify_steps(graph)
    eager_tokens, graph_tokens = lockstep(eager, graph, prompts, params, arrivals={3: 2}, bound=BOUND, exact=False)
    compared = 0
    for want, have, other in zip(expected, graph_tokens, eager_tokens):
        n = trusted_prefix(want)
        assert have[:n] == want.token_ids[:n] == other[:n]
        compared += n
    assert compared >= sum(lengths) // 2
    assert verify.calls and len(verify_steps) > len(verify.calls)  # graphs, and a prefill step eager
    assert any(padded > n for n, padded, _ in verify.calls), verify.calls
    assert any(min(lens) < 1 + K for _, _, lens in verify.calls), verify.calls
    stats = graph.get_metrics()
    assert stats["spec_decode_num_draft_tokens"] > stats["spec_decode_num_accepted_tokens"] > 0
    assert_all_free(stats)


def test_gpu_graph_verify_with_synthetic_drafts_equals_eager_verify(checkpoint):
    config = {"method": "synthetic", "num_speculative_tokens": K, "synthetic_acceptance_length": 2.4,
              "auto_disable": False}  # fmt: skip
    prompts = random_prompts([5, 8, 11, 4, 7, 30], seed=6)
    params = greedy([11, 6, 9, 3, 8, 20])
    graph = spec_llm(checkpoint, config, device="cuda", max_num_seqs=8)
    eager = spec_llm(checkpoint, config, device="cuda", max_num_seqs=8)
    eager.llm_engine.runner.verify_graphs = None
    verify = Recorder(graph.llm_engine.runner.verify_graphs)
    verify_steps = count_verify_steps(graph)
    eager_tokens, graph_tokens = lockstep(eager, graph, prompts, params, bound=BOUND, exact=False)
    same = sum(a == b for a, b in zip(eager_tokens, graph_tokens))
    print(f"sequences with the same tokens on both verify paths: {same} of {len(prompts)}")
    assert same >= len(prompts) // 2
    assert len(verify.calls) == len(verify_steps) > 0
    assert_all_free(graph.get_metrics())
