"""Kimi Linear (moonshotai/Kimi-Linear-48B-A3B): KDA and MLA token mixers, dense MLP and MoE, in plain PyTorch.

Module names are the checkpoint's weight names (``model.layers.{i}.self_attn.q_proj.weight``, ...),
except the routed experts, which are stored stacked and loaded from ``experts.{e}.w1|w2|w3.weight``
through :meth:`deltaserve.layers.moe.FusedExperts.checkpoint_weights`. The forward takes one flat
varlen batch; its metadata comes from the forward context, its states from ``bind_caches``.
"""

from __future__ import annotations

import torch
from torch import nn

from deltaserve.kv.spec import KVCacheSpec
from deltaserve.distributed.parallel_state import get_tp_group
from deltaserve.layers.kda import KimiDeltaAttention
from deltaserve.layers.mla import MLAAttention
from deltaserve.layers.mlp import GatedMLP
from deltaserve.layers.moe import SparseMoeBlock
from deltaserve.layers.norm import RMSNorm
from deltaserve.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from deltaserve.models import kimi_linear_config
from deltaserve.state.layout import kda_layout, resolve_dtype
from deltaserve.state.pool import StateGroup, StatePool

LINEAR_ATTENTION = "linear_attention"
FULL_ATTENTION = "full_attention"


class KimiDecoderLayer(nn.Module):
    """Pre-norm block: token mixer (KDA or MLA), then dense MLP or MoE, each with a residual add."""

    def __init__(self, hf_config, layer_idx: int, dtype: torch.dtype):
        super().__init__()
        c = hf_config
        self.layer_type = c.layer_types[layer_idx]
        if self.layer_type == LINEAR_ATTENTION:
            self.self_attn = KimiDeltaAttention.from_config(c, layer_idx, dtype)
        elif self.layer_type == FULL_ATTENTION:
            self.self_attn = MLAAttention.from_config(c, layer_idx, dtype)
        else:
            raise ValueError(
                f"layer_types[{layer_idx}] = {self.layer_type!r}; expected {LINEAR_ATTENTION!r} or {FULL_ATTENTION!r}"
            )
        # NOTE: two attribute names, because the checkpoint names differ: mlp.* vs block_sparse_moe.*
        self.is_moe = c.mlp_layer_types[layer_idx] == "sparse"
        if self.is_moe:
            self.block_sparse_moe = SparseMoeBlock(c, dtype)
        else:
            self.mlp = GatedMLP(c.hidden_size, c.intermediate_size, c.hidden_act, dtype)
        self.input_layernorm = RMSNorm(c.hidden_size, eps=c.rms_norm_eps, dtype=dtype)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, eps=c.rms_norm_eps, dtype=dtype)

    def forward(
        self, positions: torch.Tensor, hidden_states: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns ``(hidden_states, residual)``; their sum is the block's output (vLLM's fused residual)."""
        if residual is None:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        hidden_states = self.self_attn(positions, hidden_states)
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        ffn = self.block_sparse_moe if self.is_moe else self.mlp
        return ffn(hidden_states), residual


class KimiLinearModel(nn.Module):
    def __init__(self, hf_config, dtype: torch.dtype):
        super().__init__()
        c = hf_config
        self.embed_tokens = VocabParallelEmbedding(c.vocab_size, c.hidden_size, dtype=dtype)
        self.layers = nn.ModuleList([KimiDecoderLayer(c, i, dtype) for i in range(c.num_hidden_layers)])
        self.norm = RMSNorm(c.hidden_size, eps=c.rms_norm_eps, dtype=dtype)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden_states, residual = self.embed_tokens(input_ids), None
        for layer in self.layers:
            hidden_states, residual = layer(positions, hidden_states, residual)
        hidden_states, _ = self.norm(hidden_states, residual)
        return hidden_states


class KimiLinearForCausalLM(nn.Module):
    """The model the engine runs: ``forward(input_ids [T], positions [T]) -> hidden [T, hidden]`` inside
    ``with forward_context(ctx)``, then ``compute_logits``. Parameters are in ``dtype`` except the
    float32 ones (KDA's ``A_log``, ``dt_bias``; the router's ``e_score_correction_bias``)."""

    # Config checks the loader runs before (raw config.json dict) and after transformers reads it.
    check_raw_config = staticmethod(kimi_linear_config.check_raw_config)
    check_config = staticmethod(kimi_linear_config.check_config)

    def __init__(self, hf_config, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.config = hf_config
        self.dtype = dtype
        self.model = KimiLinearModel(hf_config, dtype)
        self.lm_head = ParallelLMHead(hf_config.vocab_size, hf_config.hidden_size, dtype=dtype)
        if getattr(hf_config, "tie_word_embeddings", False):
            self.lm_head.weight = self.model.embed_tokens.weight
        types = hf_config.layer_types
        self.kda_layer_ids = [i for i, t in enumerate(types) if t == LINEAR_ATTENTION]
        self.attn_layer_ids = [i for i, t in enumerate(types) if t == FULL_ATTENTION]
        self.requires_grad_(False)
        self.eval()

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, positions)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """``[N, hidden]`` -> float32 logits ``[N, vocab]``."""
        return self.lm_head(hidden_states).float()

    # ---- caches ------------------------------------------------------------------------------

    def state_groups(
        self, tp_size: int | None = None, cache_dtype: str | torch.dtype = "auto", num_spec: int = 0, conv_layout: str = "SD"
    ) -> dict[str, StateGroup]:
        """Pool groups of the linear layers on one TP rank (``tp_size`` None: this process's TP size):
        ``{"kda": StateGroup(layout, num_kda_layers)}``, empty without KDA."""
        if not self.kda_layer_ids:
            return {}
        c = self.config
        tp_size = get_tp_group().world_size if tp_size is None else tp_size
        layout = kda_layout(
            c.linear_num_heads,
            c.linear_head_dim,
            conv_kernel_size=c.linear_conv_kernel_dim,
            tp_size=tp_size,
            num_spec=num_spec,
            conv_layout=conv_layout,
            model_dtype=self.dtype,
            cache_dtype=cache_dtype,
        )
        return {"kda": StateGroup(layout, len(self.kda_layer_ids))}

    def kv_cache_spec(self, cache_dtype: str | torch.dtype = "auto") -> KVCacheSpec:
        """MLA latent cache: one entry of ``kv_lora_rank + qk_rope_head_dim`` per token and full-attention layer."""
        c = self.config
        return KVCacheSpec(
            num_layers=len(self.attn_layer_ids),
            entry_dim=c.kv_lora_rank + c.qk_rope_head_dim,
            dtype=resolve_dtype(cache_dtype, self.dtype, "cache_dtype"),
        )

    def bind_caches(self, pool: StatePool | None, kv_cache: torch.Tensor | None) -> None:
        """Give every layer its views: KDA layer ``k`` gets ``pool.layer_state("kda", k)``, MLA layer ``j``
        gets ``kv_cache[j]`` (``kv_cache``: ``[num_attn_layers, num_blocks, block_size, entry_dim]``)."""
        if self.kda_layer_ids:
            if pool is None or "kda" not in pool.groups:
                raise ValueError("the model has KDA layers but the state pool has no 'kda' group")
            group = pool.groups["kda"]
            if group.num_layers != len(self.kda_layer_ids):
                raise ValueError(f"pool group 'kda' has {group.num_layers} layers, the model {len(self.kda_layer_ids)}")
            for k, i in enumerate(self.kda_layer_ids):
                self.model.layers[i].self_attn.bind_state(pool.layer_state("kda", k), group.layout)
        if self.attn_layer_ids:
            spec = self.kv_cache_spec()
            if (
                kv_cache is None
                or kv_cache.dim() != 4
                or kv_cache.shape[0] != spec.num_layers
                or kv_cache.shape[-1] != spec.entry_dim
            ):
                found = None if kv_cache is None else tuple(kv_cache.shape)
                raise ValueError(
                    f"kv_cache must be [{spec.num_layers}, num_blocks, block_size, {spec.entry_dim}], got {found}"
                )
            for j, i in enumerate(self.attn_layer_ids):
                self.model.layers[i].self_attn.kv_cache = kv_cache[j]
