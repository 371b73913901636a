"""Qwen3-Next (Qwen/Qwen3-Next-80B-A3B): Gated DeltaNet and gated attention token mixers, MoE, in plain PyTorch.

Module names are the checkpoint's (``model.layers.{i}.linear_attn.in_proj_qkvz.weight``,
``model.layers.{i}.self_attn.q_proj.weight``, ``model.layers.{i}.mlp.experts.{e}.gate_proj.weight``, ...);
the routed experts are stored stacked (:class:`deltaserve.layers.moe.FusedExperts`). Every norm
outside the GDN layer is zero-centred (``1 + w``). The ``mtp.*`` tensors (the multi-token-prediction
head) are not used yet. Qwen3.5 (``models/qwen3_5.py``) is the same model with other projections
and feed-forward layers, so it builds on the classes here.
"""

from __future__ import annotations

import torch
from torch import nn

from deltaserve.kv.spec import KVCacheSpec
from deltaserve.layers.attention import GatedAttention
from deltaserve.layers.gdn import GatedDeltaNet
from deltaserve.layers.linear import kv_heads_per_rank
from deltaserve.layers.mlp import GatedMLP
from deltaserve.layers.moe import SparseMoeBlock
from deltaserve.layers.norm import ZeroCenteredRMSNorm
from deltaserve.models import qwen_config
from deltaserve.models.qwen_config import gdn_layout_of
from deltaserve.models.hybrid import LINEAR_ATTENTION, HybridDecoderLayer, HybridForCausalLM, HybridModel
from deltaserve.state.layout import StateLayout, resolve_dtype

MTP_NOTE = "the multi-token-prediction head (for speculative decoding; not used yet)"


class QwenDecoderLayer(HybridDecoderLayer):
    """``linear_attn`` (GDN) or ``self_attn`` (gated attention), then ``mlp`` (dense or MoE)."""

    def __init__(self, hf_config, layer_idx: int, dtype: torch.dtype, projection: str, mlp: nn.Module):
        super().__init__()
        c = hf_config
        if c.layer_types[layer_idx] == LINEAR_ATTENTION:
            self.linear_attn = GatedDeltaNet.from_config(c, layer_idx, dtype, projection=projection)
        else:
            self.self_attn = GatedAttention.from_config(c, layer_idx, dtype)
        self.mlp = mlp
        self.input_layernorm = ZeroCenteredRMSNorm(c.hidden_size, eps=c.rms_norm_eps, dtype=dtype)
        self.post_attention_layernorm = ZeroCenteredRMSNorm(c.hidden_size, eps=c.rms_norm_eps, dtype=dtype)

    @property
    def mixer(self) -> nn.Module:
        return self.linear_attn if hasattr(self, "linear_attn") else self.self_attn

    @property
    def ffn(self) -> nn.Module:
        return self.mlp


class Qwen3NextForCausalLM(HybridForCausalLM):
    """Qwen3-Next. Caches: pool group ``"gdn"`` (recurrent states in float32 by default, see
    :func:`recurrent_state_dtype`), per-head K/V cache for the attention layers."""

    linear_group = "gdn"
    # Qwen3-Next fuses its GDN input projections per key head; Qwen3.5 splits them.
    projection = "qkvz"
    ignored_checkpoint_prefixes = {"mtp.": MTP_NOTE}
    check_config = staticmethod(qwen_config.check_config)

    def __init__(self, hf_config, dtype: torch.dtype = torch.bfloat16):
        super().__init__(hf_config, dtype)
        c = self.config
        layers = [
            QwenDecoderLayer(c, i, dtype, self.projection, self.make_mlp(c, i, dtype)) for i in range(c.num_hidden_layers)
        ]
        norm = ZeroCenteredRMSNorm(c.hidden_size, eps=c.rms_norm_eps, dtype=dtype)
        self.build_text_model(HybridModel(c.vocab_size, c.hidden_size, layers, norm, dtype))
        self._finish(hf_config)

    def build_text_model(self, text_model: nn.Module) -> None:
        """Place the text model where the checkpoint keeps it (``model.*``)."""
        self.model = text_model

    @staticmethod
    def make_mlp(c, layer_idx: int, dtype: torch.dtype) -> nn.Module:
        """MoE on every ``decoder_sparse_step``-th layer outside ``mlp_only_layers``, else the dense MLP."""
        sparse_step = getattr(c, "decoder_sparse_step", 1) or 1
        if (
            layer_idx not in (getattr(c, "mlp_only_layers", None) or [])
            and c.num_experts > 0
            and (layer_idx + 1) % sparse_step == 0
        ):
            return SparseMoeBlock.from_qwen_config(c, dtype)
        return GatedMLP(c.hidden_size, c.intermediate_size, c.hidden_act, dtype)

    def linear_layout(self, tp_size, cache_dtype, num_spec, conv_layout, mamba_ssm_cache_dtype) -> StateLayout:
        return gdn_layout_of(
            self.config, model_dtype=self.dtype, mamba_ssm_cache_dtype=mamba_ssm_cache_dtype, tp_size=tp_size,
            num_spec=num_spec, conv_layout=conv_layout, cache_dtype=cache_dtype,
        )  # fmt: skip

    def kv_cache_spec(self, cache_dtype: str | torch.dtype = "auto") -> KVCacheSpec:
        """Per-head K and V: ``2 * num_key_value_heads * head_dim`` values per token and attention layer."""
        c = self.config
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        dtype = resolve_dtype(cache_dtype, self.dtype, "cache_dtype")
        # NOTE: one TP rank's KV heads (split, or one replicated head a rank).
        num_kv_heads, _ = kv_heads_per_rank(c.num_key_value_heads, self.tp_size)
        return KVCacheSpec.gqa(len(self.attn_layer_ids), num_kv_heads, head_dim, dtype)
