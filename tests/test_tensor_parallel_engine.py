"""Tensor parallelism on the CPU (gloo, real worker processes), Kimi-Linear at TP 2 and 4 against TP 1.

Every scenario runs on a TP-1 engine and a TP-N engine of the same settings (so the same schedule)
and compares greedy tokens (identical) and the logits of every step (within 1e-5, float32). TP is
also checked against transformers' model directly.
"""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from deltaserve import LLM
from deltaserve.state.layout import kda_layout
from helpers_engine import GreedyReference
from helpers_model import reference_model
from helpers_tp import (
    ENGINE, SCENARIOS, assert_checkpoints_sharded, assert_same_run, greedy, make_tp_checkpoint, run_scenario, tapped,
)  # fmt: skip

HEADS, HEAD_DIM, KERNEL, KDA_LAYERS = 4, 16, 4, 3


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_tp_checkpoint(tmp_path_factory.mktemp("tp"))


@pytest.fixture(scope="module")
def reference_llm(checkpoint):
    return tapped(LLM(str(checkpoint), **ENGINE))


@pytest.fixture(scope="module")
def reference(reference_llm):
    # NOTE: prefix_hits last: its checkpoints stay in the cache for the checkpoint test.
    return {name: run_scenario(reference_llm, name) for name in SCENARIOS}


@pytest.fixture(scope="module", params=[2, 4], ids=lambda tp: f"tp{tp}")
def tp_llm(request, checkpoint):
    llm = tapped(LLM(str(checkpoint), tensor_parallel_size=request.param, **ENGINE))
    yield llm
    llm.shutdown()


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_greedy_tokens_and_logits_match_tp1(tp_llm, reference, name):
    assert_same_run(run_scenario(tp_llm, name), reference[name], name)


@pytest.fixture(scope="module")
def transformers_tokens(checkpoint):
    prompt, n = SCENARIOS["alone"][0][0], SCENARIOS["alone"][1]
    return GreedyReference(reference_model(checkpoint))(prompt, n)


def test_tp_greedy_matches_transformers(tp_llm, transformers_tokens):
    prompt, n = SCENARIOS["alone"][0][0], SCENARIOS["alone"][1]
    assert tp_llm.generate([prompt], greedy(n), use_tqdm=False)[0].outputs[0].token_ids == transformers_tokens


def test_each_rank_pool_holds_the_per_rank_layout(tp_llm):
    engine = tp_llm.llm_engine
    tp = engine.config.tensor_parallel_size
    slots, blocks = engine.config.num_state_slots + 1, engine.config.num_kv_blocks
    layout = kda_layout(HEADS, HEAD_DIM, conv_kernel_size=KERNEL, tp_size=tp, model_dtype=torch.float32)
    shapes = engine.collective_rpc("cache_shapes")
    assert len(shapes) == tp
    for rank_shapes in shapes:
        # [q_local | k_local | v_local] over the last K-1 inputs; the local heads' (D, D) states.
        assert rank_shapes["conv.kda"] == (KDA_LAYERS, slots, KERNEL - 1, 3 * HEADS * HEAD_DIM // tp)
        assert rank_shapes["recurrent.kda"] == (KDA_LAYERS, slots, HEADS // tp, HEAD_DIM, HEAD_DIM)
        assert rank_shapes["conv.kda"][2:] == layout.conv_shape
        assert rank_shapes["recurrent.kda"][2:] == layout.recurrent_shape
        # MLA: one latent per token (kv_lora_rank 32 + rope 8), replicated on every rank.
        assert rank_shapes["kv_cache"] == (1, blocks, ENGINE["block_size"], 32 + 8)


def rank_weights(runner) -> dict[str, torch.Tensor]:
    attn = runner.model.model.layers[1].self_attn
    return {"q_proj": attn.q_proj.weight.clone(), "o_proj": attn.o_proj.weight.clone(), "A_log": attn.A_log.clone()}


def test_each_rank_holds_its_slice_of_the_checkpoint(tp_llm, checkpoint):
    engine = tp_llm.llm_engine
    tp = engine.config.tensor_parallel_size
    weights = engine.collective_rpc(rank_weights)
    name = "model.layers.1.self_attn."
    with safe_open(checkpoint / "model.safetensors", framework="pt") as f:
        q, o, a_log = (f.get_tensor(name + n) for n in ("q_proj.weight", "o_proj.weight", "A_log"))
    rows, heads = q.shape[0] // tp, HEADS // tp
    for rank, w in enumerate(weights):
        assert torch.equal(w["q_proj"], q[rank * rows : (rank + 1) * rows])
        assert torch.equal(w["o_proj"], o[:, rank * rows : (rank + 1) * rows])
        assert torch.equal(w["A_log"], a_log[:, :, rank * heads : (rank + 1) * heads])


def test_prefix_cache_checkpoints_hold_each_ranks_share_of_the_tp1_states(tp_llm, reference, reference_llm):
    # Checkpoints are copied on rank 0 when decided and on the other ranks from the step broadcast.
    run_scenario(tp_llm, "prefix_hits")
    assert_checkpoints_sharded(tp_llm, reference_llm, "kda")


def test_prompt_logprobs_match_tp1(tp_llm, reference_llm):
    # NOTE: the prompt's logits are all-gathered on every rank; 37 tokens in chunks of 16.
    from deltaserve import SamplingParams

    prompt = SCENARIOS["chunked"][0][0]
    params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True, prompt_logprobs=1)
    (got,) = tp_llm.generate([prompt], params, use_tqdm=False)
    (want,) = reference_llm.generate([prompt], params, use_tqdm=False)
    assert got.prompt_logprobs[0] is None and len(got.prompt_logprobs) == len(prompt)
    for i in range(1, len(prompt)):
        assert got.prompt_logprobs[i].keys() == want.prompt_logprobs[i].keys()
        for token, entry in want.prompt_logprobs[i].items():
            assert abs(got.prompt_logprobs[i][token].logprob - entry.logprob) < 1e-4
