"""The decode-graph runner's padded static buffers (run eagerly on the CPU) give transformers' greedy tokens.

On CUDA the same buffers are captured into graphs; here ``use_graphs=False`` replays the padded
forward eagerly, so the padding rules (null slot 0, ``slot_mapping = -1``, sequence length 0,
stale rows of earlier steps reset) are checked without a GPU.
"""

from __future__ import annotations

import pytest

from deltaserve import LLM, SamplingParams
from deltaserve.engine.cuda_graph import DecodeGraphs, capture_sizes
from helpers_engine import GreedyReference, assert_all_free, random_prompts
from helpers_model import make_checkpoint, reference_model


@pytest.fixture(scope="module", params=["kimi_linear", "qwen3_next"])
def checkpoint(request, tmp_path_factory):
    """Both layer kinds (KDA + MLA; GDN + gated GQA attention) through the padded buffers."""
    return make_checkpoint(tmp_path_factory.mktemp("decode_graphs"), arch=request.param)


def test_capture_sizes_stop_at_the_first_that_holds_max_num_seqs():
    assert capture_sizes(1) == [1]
    assert capture_sizes(5) == [1, 2, 4, 8]
    assert capture_sizes(256) == [1, 2, 4, 8, 16, 32, 64, 128, 256]
    assert capture_sizes(300) == [1, 2, 4, 8, 16, 32, 64, 128, 256]


def test_padded_decode_batches_match_transformers(checkpoint):
    llm = LLM(model=str(checkpoint), dtype="float32", block_size=4, max_num_seqs=8)
    runner = llm.llm_engine.runner
    graphs = DecodeGraphs(
        runner.model, max_num_seqs=8, max_model_len=runner.config.max_model_len, block_size=4,
        device=runner.device, use_graphs=False,
    )  # fmt: skip
    padded_sizes = []
    run = graphs.run

    def counting_run(input_ids, positions, ctx, *args):
        padded_sizes.append((ctx.num_seqs, graphs.padded_size(ctx.num_seqs)))
        return run(input_ids, positions, ctx, *args)

    graphs.run = counting_run
    runner.cuda_graphs = graphs
    # Different output lengths: the batch shrinks 5 -> 4 -> ... and rows move between steps,
    # so padded rows of a step held live sequences in the step before.
    prompts = random_prompts([5, 9, 3, 14, 7], seed=4)
    lengths = [3, 12, 7, 9, 1]
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in lengths]
    outputs = llm.generate(prompts, params, use_tqdm=False)
    reference = GreedyReference(reference_model(checkpoint))
    assert [o.outputs[0].token_ids for o in outputs] == [reference(p, n) for p, n in zip(prompts, lengths)]
    assert any(padded > n for n, padded in padded_sizes), padded_sizes
    assert_all_free(llm.get_metrics())
