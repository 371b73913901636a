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
from deltaserve.layers.kda import KimiDeltaAttention
from deltaserve.layers.mla import MLAAttention
from deltaserve.layers.mlp import GatedMLP
from deltaserve.layers.moe import SparseMoeBlock
from deltaserve.layers.norm import RMSNorm
from deltaserve.models import kimi_linear_config
from deltaserve.models.hybrid import LINEAR_ATTENTION, HybridDecoderLayer, HybridForCausalLM, HybridModel
from deltaserve.state.layout import StateLayout, kda_layout, resolve_dtype


class KimiDecoderLayer(HybridDecoderLayer):
    """Token mixer KDA or MLA (both under ``self_attn``), then dense MLP or MoE."""

    def __init__(self, hf_config, layer_idx: int, dtype: torch.dtype):
        super().__init__()
        c = hf_config
        layer_type = c.layer_types[layer_idx]
        if layer_type == LINEAR_ATTENTION:
            self.self_attn = KimiDeltaAttention.from_config(c, layer_idx, dtype)
        else:
            self.self_attn = MLAAttention.from_config(c, layer_idx, dtype)
        # NOTE: two attribute names, because the checkpoint names differ: mlp.* vs block_sparse_moe.*
        if c.mlp_layer_types[layer_idx] == "sparse":
            self.block_sparse_moe = SparseMoeBlock.from_kimi_config(c, dtype)
        else:
            self.mlp = GatedMLP(c.hidden_size, c.intermediate_size, c.hidden_act, dtype)
        self.input_layernorm = RMSNorm(c.hidden_size, eps=c.rms_norm_eps, dtype=dtype)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, eps=c.rms_norm_eps, dtype=dtype)

    @property
    def mixer(self) -> nn.Module:
        return self.self_attn

    @property
    def ffn(self) -> nn.Module:
        return self.block_sparse_moe if hasattr(self, "block_sparse_moe") else self.mlp


class KimiLinearForCausalLM(HybridForCausalLM):
    """Kimi Linear; parameters are in ``dtype`` except the float32 ones (KDA's ``A_log``, ``dt_bias``;
    the router's ``e_score_correction_bias``). Caches: pool group ``"kda"``, MLA latent KV cache."""

    linear_group = "kda"
    # Config checks the loader runs before (raw config.json dict) and after transformers reads it.
    check_raw_config = staticmethod(kimi_linear_config.check_raw_config)
    check_config = staticmethod(kimi_linear_config.check_config)

    def __init__(self, hf_config, dtype: torch.dtype = torch.bfloat16):
        super().__init__(hf_config, dtype)
        c = self.config
        layers = [KimiDecoderLayer(c, i, dtype) for i in range(c.num_hidden_layers)]
        norm = RMSNorm(c.hidden_size, eps=c.rms_norm_eps, dtype=dtype)
        self.model = HybridModel(c.vocab_size, c.hidden_size, layers, norm, dtype)
        self._finish(hf_config)

    def linear_layout(self, tp_size, cache_dtype, num_spec, conv_layout, mamba_ssm_cache_dtype) -> StateLayout:
        """KDA: float32 recurrent states whatever ``mamba_ssm_cache_dtype`` says."""
        c = self.config
        return kda_layout(
            c.linear_num_heads,
            c.linear_head_dim,
            conv_kernel_size=c.linear_conv_kernel_dim,
            tp_size=tp_size,
            num_spec=num_spec,
            conv_layout=conv_layout,
            model_dtype=self.dtype,
            cache_dtype=cache_dtype,
        )

    def kv_cache_spec(self, cache_dtype: str | torch.dtype = "auto") -> KVCacheSpec:
        """MLA latent cache: one entry of ``kv_lora_rank + qk_rope_head_dim`` per token and full-attention layer."""
        c = self.config
        dtype = resolve_dtype(cache_dtype, self.dtype, "cache_dtype")
        return KVCacheSpec.mla(len(self.attn_layer_ids), c.kv_lora_rank, c.qk_rope_head_dim, dtype)
