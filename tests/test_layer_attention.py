"""Gated attention, partial RoPE, zero-centred RMSNorm and the Qwen MoE block vs transformers' Qwen3-Next /
Qwen3.5 modules (float32, CPU); the paged GQA op vs dense causal attention."""

from __future__ import annotations

import pytest
import torch
from conftest import rel_err
from transformers import Qwen3_5TextConfig, Qwen3NextConfig
from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5TextRotaryEmbedding
from transformers.models.qwen3_next import modeling_qwen3_next as hf

from deltaserve.forward_context import forward_context, make_forward_context
from deltaserve.kv.spec import KVCacheSpec, split_kv
from deltaserve.layers.attention import GatedAttention
from deltaserve.layers.moe import SparseMoeBlock
from deltaserve.layers.norm import ZeroCenteredRMSNorm
from deltaserve.layers.rotary import PartialRotaryEmbedding
from deltaserve.ops.attention import paged_gqa_attention_ref

BOUND = 1e-5
SIZES = dict(
    hidden_size=48, num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=64, num_hidden_layers=1,
    num_experts=6, num_experts_per_tok=2, moe_intermediate_size=24, shared_expert_intermediate_size=20,
)  # fmt: skip


def config(factor: float = 0.5) -> Qwen3NextConfig:
    return Qwen3NextConfig(**SIZES, rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": factor})


def causal_mask(n: int) -> torch.Tensor:
    return torch.full((n, n), float("-inf")).triu(1)[None, None]


@pytest.mark.parametrize("factor", [0.25, 0.5, 1.0])
def test_partial_rotary_matches_qwen3_next_and_qwen3_5_mrope_for_text(factor):
    params = {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": factor, "mrope_section": [2, 1, 1],
              "mrope_interleaved": True}  # fmt: skip
    positions = torch.arange(11) * 3
    q, k = torch.randn(11, 4, 16), torch.randn(11, 2, 16)
    ours = PartialRotaryEmbedding(16, int(16 * factor), 1e4)(positions, q, k)
    for rotary in (hf.Qwen3NextRotaryEmbedding(config(factor)), Qwen3_5TextRotaryEmbedding(Qwen3_5TextConfig(**{
            k: v for k, v in SIZES.items() if "expert" not in k}, rope_parameters=params))):  # fmt: skip
        cos, sin = rotary(q, positions[None])
        ref_q, ref_k = hf.apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin)
        assert rel_err(ours[0], ref_q[0].transpose(0, 1)) < 1e-6 and rel_err(ours[1], ref_k[0].transpose(0, 1)) < 1e-6


def test_zero_centered_rms_norm_matches_transformers():
    ref = hf.Qwen3NextRMSNorm(32, eps=1e-6)
    ours = ZeroCenteredRMSNorm(32, eps=1e-6)
    with torch.no_grad():
        ref.weight.normal_(0, 0.3)
        ours.weight.copy_(ref.weight)
    x = 4 * torch.randn(5, 32)
    assert rel_err(ours(x), ref(x)) < 1e-6


def test_gated_attention_over_the_paged_cache_matches_transformers_in_two_chunks():
    c = config()
    c._attn_implementation = "eager"
    ref = hf.Qwen3NextAttention(c, 0).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.2)
    ours = GatedAttention.from_config(c, 0)
    ours.load_state_dict(ref.state_dict(), strict=False)
    spec = KVCacheSpec.gqa(1, 2, 16, torch.float32)
    cache = torch.full((1, 8, 4, spec.entry_dim), float("nan"))
    ours.kv_cache = cache[0]
    rotary = hf.Qwen3NextRotaryEmbedding(c)
    lens, blocks = {"a": 13, "b": 6}, {"a": [5, 1, 7, 2], "b": [0, 3]}
    xs = {s: torch.randn(n, 48) for s, n in lens.items()}
    expected = {}
    with torch.no_grad():
        for s, x in xs.items():
            emb = rotary(x[None], torch.arange(len(x))[None])
            expected[s] = ref(x[None], emb, causal_mask(len(x)))[0][0]
        # chunk 1: a's first 9 tokens and all of b; chunk 2: a's last 4
        outs = {"a": [], "b": []}
        for batch in ([("a", 0, 9), ("b", 0, 6)], [("a", 9, 13)]):
            ctx = make_forward_context([e - s for _, s, e in batch], [s for _, s, _ in batch], [0] * len(batch),
                                       block_tables=[blocks[n] for n, _, _ in batch], block_size=4)  # fmt: skip
            positions = torch.cat([torch.arange(s, e) for _, s, e in batch])
            with forward_context(ctx):
                out = ours(positions, torch.cat([xs[n][s:e] for n, s, e in batch]))
            for (n, _, _), part in zip(batch, out.split([e - s for _, s, e in batch])):
                outs[n].append(part)
    for s in lens:
        assert rel_err(torch.cat(outs[s]), expected[s]) < BOUND, s
    used = sorted(blocks["a"] + blocks["b"][:2])
    assert cache[0, [b for b in range(8) if b not in used]].isnan().all()


def test_paged_gqa_attention_matches_dense_causal_attention():
    heads, kv_heads, d, block = 6, 2, 8, 4
    k_all, v_all = torch.randn(10, kv_heads, d), torch.randn(10, kv_heads, d)
    cache = torch.zeros(5, block, 2 * kv_heads * d)
    k_cache, v_cache = split_kv(cache, kv_heads, d)
    table = [3, 0, 4]
    for pos in range(10):
        k_cache[table[pos // block], pos % block] = k_all[pos]
        v_cache[table[pos // block], pos % block] = v_all[pos]
    q = torch.randn(3, heads, d)  # the last 3 of 10 tokens
    out = paged_gqa_attention_ref(q, cache, num_kv_heads=kv_heads, cu_seqlens=[0, 3], seq_lens=[10],
                                  block_tables=torch.tensor([table]), scale=d**-0.5)  # fmt: skip
    keys, values = k_all.repeat_interleave(3, 1), v_all.repeat_interleave(3, 1)
    mask = torch.arange(10)[None, :] <= torch.arange(7, 10)[:, None]
    expected = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1), keys.transpose(0, 1), values.transpose(0, 1), attn_mask=mask
    ).transpose(0, 1)
    assert rel_err(out, expected) < 1e-6


def test_qwen_moe_block_matches_transformers():
    c = config()
    ref = hf.Qwen3NextSparseMoeBlock(c).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.3)
    ours = SparseMoeBlock.from_qwen_config(c, torch.float32)
    with torch.no_grad():
        ours.gate.weight.copy_(ref.gate.weight)
        ours.experts.w13_weight.copy_(ref.experts.gate_up_proj)
        ours.experts.w2_weight.copy_(ref.experts.down_proj)
        ours.shared_expert.load_state_dict(ref.shared_expert.state_dict())
        ours.shared_expert_gate.weight.copy_(ref.shared_expert_gate.weight)
    x = torch.randn(1, 40, 48)
    assert rel_err(ours(x[0]), ref(x)[0]) < BOUND
