"""Tensor parallelism on the CPU (gloo, real worker processes) for the GDN models: Qwen3-Next (fused
``qkvz`` projections, MoE with a gated shared expert, GQA) at TP 2 (KV heads split) and TP 4 (KV heads
replicated), and Qwen3.5-MoE (split projections, fused expert tensors) at TP 2, each against TP 1:
greedy tokens identical and every step's logits within 1e-5, alone, batched, chunked, preempted, with
prefix-cache hits; each rank's pool and KV cache of the per-rank shapes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from deltaserve import LLM
from deltaserve.models.tiny import make_tiny
from deltaserve.state.layout import gdn_layout
from helpers_engine import GreedyReference
from helpers_model import reference_model
from helpers_tp import ENGINE, SCENARIOS, assert_checkpoints_sharded, assert_same_run, greedy, run_scenario, tapped

# NOTE: 4 key heads with 8 value heads (GVA), 4 query heads on 2 KV heads: TP 4 divides the heads
# and replicates each KV head on 2 ranks; vocab 330 pads the last rank's vocabulary shard.
OVERRIDES = {
    "qwen3_next": {"linear_num_key_heads": 4, "linear_num_value_heads": 8, "vocab_size": 330},
    "qwen3_5_moe": {},
}
CASES = [("qwen3_next", 2), ("qwen3_next", 4), ("qwen3_5_moe", 2)]


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """Per architecture: (checkpoint, TP-1 engine, its scenario results), built on first use."""
    built = {}

    def get(arch: str):
        if arch not in built:
            path = make_tiny(Path(tmp_path_factory.mktemp(arch)) / "ckpt", seed=2, overrides=OVERRIDES[arch], arch=arch)
            llm = tapped(LLM(str(path), **ENGINE))
            built[arch] = (path, llm, {name: run_scenario(llm, name) for name in SCENARIOS})
        return built[arch]

    return get


@pytest.fixture(scope="module", params=CASES, ids=lambda c: f"{c[0]}-tp{c[1]}")
def case(request, references):
    arch, tp = request.param
    path, reference_llm, reference = references(arch)
    llm = tapped(LLM(str(path), tensor_parallel_size=tp, **ENGINE))
    yield llm, reference_llm, reference, path
    llm.shutdown()


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_greedy_tokens_and_logits_match_tp1(case, name):
    llm, _, reference, _ = case
    assert_same_run(run_scenario(llm, name), reference[name], name)


@pytest.fixture(scope="module")
def transformers_tokens():
    """transformers' greedy tokens of the ``alone`` prompt, per checkpoint (its model loaded once)."""
    cache = {}

    def get(path: Path) -> list[int]:
        if path not in cache:
            prompt, n = SCENARIOS["alone"][0][0], SCENARIOS["alone"][1]
            cache[path] = GreedyReference(reference_model(path))(prompt, n)
        return cache[path]

    return get


def test_tp_greedy_matches_transformers(case, transformers_tokens):
    llm, _, _, path = case
    prompt, n = SCENARIOS["alone"][0][0], SCENARIOS["alone"][1]
    assert llm.generate([prompt], greedy(n), use_tqdm=False)[0].outputs[0].token_ids == transformers_tokens(path)


def test_each_rank_pool_and_kv_cache_hold_the_per_rank_shapes(case):
    llm, reference_llm, _, _ = case
    engine, c = llm.llm_engine, llm.llm_engine.hf_config
    tp = engine.config.tensor_parallel_size
    hk, hv, dk, dv = c.linear_num_key_heads, c.linear_num_value_heads, c.linear_key_head_dim, c.linear_value_head_dim
    layout = gdn_layout(hk, hv, dk, dv, conv_kernel_size=4, tp_size=tp, model_dtype=torch.float32, ssm_dtype="float32")
    num_gdn, num_attn = c.layer_types.count("linear_attention"), c.layer_types.count("full_attention")
    slots, blocks, bs = engine.config.num_state_slots + 1, engine.config.num_kv_blocks, ENGINE["block_size"]
    kv_heads = max(1, c.num_key_value_heads // tp)  # split, or one replicated head a rank
    for shapes in engine.collective_rpc("cache_shapes"):
        assert shapes["conv.gdn"] == (num_gdn, slots, 3, (2 * hk * dk + hv * dv) // tp) == (num_gdn, slots, *layout.conv_shape)
        assert shapes["recurrent.gdn"] == (num_gdn, slots, hv // tp, dv, dk) == (num_gdn, slots, *layout.recurrent_shape)
        assert shapes["kv_cache"] == (num_attn, blocks, bs, 2 * kv_heads * c.head_dim)


def test_prefix_cache_checkpoints_hold_each_ranks_share_of_the_tp1_states(case):
    llm, reference_llm, _, _ = case
    run_scenario(llm, "prefix_hits")
    run_scenario(reference_llm, "prefix_hits")
    assert_checkpoints_sharded(llm, reference_llm, "gdn")
