"""Multi-head latent attention (MLA) without rotary embedding, as in Kimi Linear's full-attention layers.

Checkpoint names: ``q_proj`` (or ``q_a_proj, q_a_layernorm, q_b_proj`` when ``q_lora_rank`` is set),
``kv_a_proj_with_mqa`` (``kv_lora_rank + qk_rope_head_dim`` out), ``kv_a_layernorm``, ``kv_b_proj``,
``o_proj``; the two projections of the input, ``q_proj`` (or ``q_a_proj``) and ``kv_a_proj_with_mqa``, are
one GEMM (``in_proj``, the names those of its rows). The paged KV cache stores one latent per token,
``[normed c_kv | k_pe]``; keys and values are rebuilt from it by :func:`deltaserve.ops.attention.paged_mla_attention`.
"""

from __future__ import annotations

import torch
from torch import nn

from deltaserve.distributed.parallel_state import get_tp_group
from deltaserve.forward_context import get_forward_context
from deltaserve.layers.linear import ColumnParallelLinear, LinearBlock, MergedLinear, RowParallelLinear
from deltaserve.layers.norm import RMSNorm
from deltaserve.ops.attention import paged_mla_attention, write_kv_cache
from deltaserve.state.layout import divide

# NOTE: transformers' KimiLinearAttention (and Moonshot's modeling code) build q_a_layernorm and
# kv_a_layernorm without passing rms_norm_eps, so they use the RMSNorm default 1e-6.
LATENT_NORM_EPS = 1e-6


class MLAAttention(nn.Module):
    """``forward(positions, hidden_states [T, hidden]) -> [T, hidden]``; reads/writes ``self.kv_cache``
    ``[num_blocks, block_size, kv_lora_rank + qk_rope_head_dim]`` set by the model's ``bind_caches``."""

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        *,
        q_lora_rank: int | None,
        kv_lora_rank: int,
        qk_nope_head_dim: int,
        qk_rope_head_dim: int,
        v_head_dim: int,
        bias: bool = False,
        layer_idx: int = 0,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        # NOTE: heads split across TP ranks; the latent (kv_a_proj_with_mqa, the KV cache) is replicated.
        self.num_heads = divide(num_heads, get_tp_group().world_size, "MLA num_attention_heads")
        self.q_lora_rank = q_lora_rank
        self.kv_lora_rank = kv_lora_rank
        self.qk_nope_head_dim = qk_nope_head_dim
        self.qk_rope_head_dim = qk_rope_head_dim
        self.qk_head_dim = qk_nope_head_dim + qk_rope_head_dim
        self.v_head_dim = v_head_dim
        self.layer_idx = layer_idx
        self.scaling = self.qk_head_dim**-0.5
        # NOTE: q_proj has no bias in the checkpoints (transformers' KimiLinearAttention), the latent ones may.
        if q_lora_rank is None:
            q_block = LinearBlock("q_proj", num_heads * self.qk_head_dim)
        else:
            q_block = LinearBlock("q_a_proj", q_lora_rank, sharded=False, bias=bias)
            self.q_a_layernorm = RMSNorm(q_lora_rank, eps=LATENT_NORM_EPS, dtype=dtype)
            self.q_b_proj = ColumnParallelLinear(q_lora_rank, num_heads * self.qk_head_dim, dtype=dtype)
        kv_block = LinearBlock("kv_a_proj_with_mqa", kv_lora_rank + qk_rope_head_dim, sharded=False, bias=bias)
        self.in_proj = MergedLinear(hidden_size, [q_block, kv_block], dtype=dtype)
        q_view, self.kv_a_proj_with_mqa = self.in_proj.views
        setattr(self, q_block.name, q_view)
        self.kv_a_layernorm = RMSNorm(kv_lora_rank, eps=LATENT_NORM_EPS, dtype=dtype)
        self.kv_b_proj = ColumnParallelLinear(kv_lora_rank, num_heads * (qk_nope_head_dim + v_head_dim), dtype=dtype)
        self.o_proj = RowParallelLinear(num_heads * v_head_dim, hidden_size, bias=bias, dtype=dtype)
        self.kv_cache: torch.Tensor | None = None

    @classmethod
    def from_config(cls, hf_config, layer_idx: int, dtype: torch.dtype | None = None) -> "MLAAttention":
        """Build from a transformers ``KimiLinearConfig``; MLA with rotary embedding is not implemented."""
        if not getattr(hf_config, "mla_use_nope", True):
            raise NotImplementedError(
                "mla_use_nope = false (MLA with rotary embedding) is not implemented; "
                "Kimi Linear uses mla_use_nope = true"
            )
        return cls(
            hf_config.hidden_size,
            hf_config.num_attention_heads,
            q_lora_rank=hf_config.q_lora_rank,
            kv_lora_rank=hf_config.kv_lora_rank,
            qk_nope_head_dim=hf_config.qk_nope_head_dim,
            qk_rope_head_dim=hf_config.qk_rope_head_dim,
            v_head_dim=hf_config.v_head_dim,
            bias=bool(getattr(hf_config, "attention_bias", False)),
            layer_idx=layer_idx,
            dtype=dtype,
        )

    @property
    def entry_dim(self) -> int:
        """Width of one token's KV cache entry."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        # NOTE: `positions` is unused: Kimi Linear's MLA has no rotary embedding (mla_use_nope).
        if self.kv_cache is None:
            raise RuntimeError(f"MLA layer {self.layer_idx} has no KV cache: call model.bind_caches() before forward()")
        ctx = get_forward_context()
        if ctx.block_tables is None or ctx.slot_mapping is None:
            raise RuntimeError("the forward context has no block_tables/slot_mapping, which MLA layers need")
        x = hidden_states
        q, kv_a = self.in_proj.split(self.in_proj(x))  # views of one GEMM's output
        if self.q_lora_rank is not None:
            q = self.q_b_proj(self.q_a_layernorm(q))
        q = q.view(x.shape[0], self.num_heads, self.qk_head_dim)
        c_kv, k_pe = kv_a.split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        latent = torch.cat([self.kv_a_layernorm(c_kv), k_pe], dim=-1)  # [T, R + Dr]
        write_kv_cache(latent, self.kv_cache, ctx.slot_mapping)
        kv_b = self.kv_b_proj.weight.view(self.num_heads, self.qk_nope_head_dim + self.v_head_dim, self.kv_lora_rank)
        w_uk, w_uv = kv_b.split([self.qk_nope_head_dim, self.v_head_dim], dim=1)
        out = paged_mla_attention(
            q,
            self.kv_cache,
            w_uk,
            w_uv,
            cu_seqlens=ctx.cu_seqlens,
            seq_lens=ctx.seq_lens,
            block_tables=ctx.block_tables,
            scale=self.scaling,
        )
        return self.o_proj(out.reshape(x.shape[0], self.num_heads * self.v_head_dim))
