"""Gated grouped-query attention with a paged per-head K/V cache (Qwen3-Next's and Qwen3.5's full attention).

Checkpoint names: ``q_proj`` (twice as wide: per head ``[query D | gate D]``), ``k_proj``, ``v_proj``,
``o_proj``, ``q_norm``, ``k_norm`` (zero-centred RMSNorm over each head). The output is
``o_proj(attention * sigmoid(gate))``. The cache holds ``[K | V]`` of each token (``KVCacheSpec.gqa``).
"""

from __future__ import annotations

import torch
from torch import nn

from deltaserve.distributed.parallel_state import get_tp_group
from deltaserve.forward_context import get_forward_context
from deltaserve.layers.linear import ColumnParallelLinear, KVParallelLinear, RowParallelLinear
from deltaserve.layers.norm import ZeroCenteredRMSNorm
from deltaserve.layers.rotary import PartialRotaryEmbedding
from deltaserve.ops.attention import paged_gqa_attention, write_kv_cache
from deltaserve.state.layout import divide


def rope_settings(hf_config) -> tuple[float, float]:
    """``(rope_theta, partial_rotary_factor)`` from ``rope_parameters`` (transformers 5) or the flat fields."""
    params = getattr(hf_config, "rope_parameters", None) or {}
    theta = params.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
    factor = params.get("partial_rotary_factor", getattr(hf_config, "partial_rotary_factor", 1.0))
    return float(theta), float(factor)


class GatedAttention(nn.Module):
    """``forward(positions, hidden_states [T, hidden]) -> [T, hidden]``; reads/writes ``self.kv_cache``
    ``[num_blocks, block_size, 2 * num_kv_heads * head_dim]`` set by the model's ``bind_caches``.

    Under TP each rank holds ``num_heads / tp`` query heads and their KV heads (``num_kv_heads / tp``,
    or one head replicated on ``tp / num_kv_heads`` ranks); ``o_proj`` all-reduces."""

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        rotary_dim: int,
        rope_theta: float,
        rms_norm_eps: float,
        bias: bool = False,
        layer_idx: int = 0,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        if num_heads % num_kv_heads != 0:
            raise ValueError(f"num_attention_heads {num_heads} is not a multiple of num_key_value_heads {num_kv_heads}")
        self.layer_idx = layer_idx
        self.scaling = head_dim**-0.5
        local_heads = divide(num_heads, get_tp_group().world_size, "attention num_attention_heads")
        # NOTE: q_proj's rows are per head [query | gate], so a contiguous split hands out whole heads.
        self.q_proj = ColumnParallelLinear(hidden_size, 2 * num_heads * head_dim, bias=bias, dtype=dtype)
        self.k_proj = KVParallelLinear(hidden_size, num_kv_heads, head_dim, bias=bias, dtype=dtype)
        self.v_proj = KVParallelLinear(hidden_size, num_kv_heads, head_dim, bias=bias, dtype=dtype)
        self.o_proj = RowParallelLinear(num_heads * head_dim, hidden_size, bias=bias, dtype=dtype)
        self.num_heads, self.num_kv_heads, self.head_dim = local_heads, self.k_proj.num_local_heads, head_dim
        self.q_norm = ZeroCenteredRMSNorm(head_dim, eps=rms_norm_eps, dtype=dtype)
        self.k_norm = ZeroCenteredRMSNorm(head_dim, eps=rms_norm_eps, dtype=dtype)
        self.rotary_emb = PartialRotaryEmbedding(head_dim, rotary_dim, rope_theta)
        self.kv_cache: torch.Tensor | None = None

    @classmethod
    def from_config(cls, hf_config, layer_idx: int, dtype: torch.dtype | None = None) -> "GatedAttention":
        """Build from a transformers ``Qwen3NextConfig`` / ``Qwen3_5TextConfig`` / ``Qwen3_5MoeTextConfig``."""
        c = hf_config
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        theta, factor = rope_settings(c)
        return cls(
            c.hidden_size,
            c.num_attention_heads,
            c.num_key_value_heads,
            head_dim,
            rotary_dim=int(head_dim * factor),
            rope_theta=theta,
            rms_norm_eps=c.rms_norm_eps,
            bias=bool(getattr(c, "attention_bias", False)),
            layer_idx=layer_idx,
            dtype=dtype,
        )

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.kv_cache is None:
            raise RuntimeError(f"attention layer {self.layer_idx} has no KV cache: call model.bind_caches() first")
        ctx = get_forward_context()
        if ctx.block_tables is None or ctx.slot_mapping is None:
            raise RuntimeError("the forward context has no block_tables/slot_mapping, which attention layers need")
        num_tokens, d = hidden_states.shape[0], self.head_dim
        # NOTE: q_proj's rows are per head [query | gate], as transformers' view(..., 2 * head_dim).chunk(2).
        query, gate = self.q_proj(hidden_states).view(num_tokens, self.num_heads, 2 * d).split(d, dim=-1)
        query = self.q_norm(query)
        key = self.k_norm(self.k_proj(hidden_states).view(num_tokens, self.num_kv_heads, d))
        value = self.v_proj(hidden_states)
        query, key = self.rotary_emb(positions, query, key)
        write_kv_cache(torch.cat([key.reshape(num_tokens, -1), value], dim=-1), self.kv_cache, ctx.slot_mapping)
        out = paged_gqa_attention(
            query,
            self.kv_cache,
            num_kv_heads=self.num_kv_heads,
            cu_seqlens=ctx.cu_seqlens,
            seq_lens=ctx.seq_lens,
            block_tables=ctx.block_tables,
            scale=self.scaling,
        )
        out = out.reshape(num_tokens, -1) * torch.sigmoid(gate.reshape(num_tokens, -1))
        return self.o_proj(out)
