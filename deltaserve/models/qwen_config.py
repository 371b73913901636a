"""Qwen3-Next / Qwen3.5 configs: checks before a model is built (each failure a ValueError naming the
field; vision-language configs are checked on their ``text_config``) and the GDN state layout they
give, with the engine's recurrent-state dtype rule.
"""

from __future__ import annotations

import torch

from deltaserve.layers.attention import rope_settings
from deltaserve.ops.activation import ACTIVATIONS
from deltaserve.models.hybrid import FULL_ATTENTION, LINEAR_ATTENTION
from deltaserve.models.kimi_linear_config import require_positive
from deltaserve.state.layout import StateLayout, gdn_layout

LAYER_TYPES = (LINEAR_ATTENTION, FULL_ATTENTION)


def recurrent_state_dtype(hf_config, mamba_ssm_cache_dtype: str = "auto") -> str:
    """The engine's GDN recurrent-state dtype: the setting, or for ``"auto"`` the config's
    ``mamba_ssm_dtype`` where it names one, else ``"float32"``."""
    if mamba_ssm_cache_dtype != "auto":
        return mamba_ssm_cache_dtype
    return getattr(hf_config, "mamba_ssm_dtype", None) or "float32"


def gdn_layout_of(hf_config, *, model_dtype: torch.dtype, mamba_ssm_cache_dtype: str = "auto", **kwargs) -> StateLayout:
    """The GDN layout of a Qwen3-Next / Qwen3.5 text config with the engine's recurrent-state dtype."""
    c = hf_config
    return gdn_layout(
        c.linear_num_key_heads,
        c.linear_num_value_heads,
        c.linear_key_head_dim,
        c.linear_value_head_dim,
        conv_kernel_size=c.linear_conv_kernel_dim,
        model_dtype=model_dtype,
        ssm_dtype=recurrent_state_dtype(c, mamba_ssm_cache_dtype),
        **kwargs,
    )


def _multiple(config, name: str, of: str) -> None:
    value, base = getattr(config, name), getattr(config, of)
    if value % base != 0:
        raise ValueError(f"{name} = {value} must be a multiple of {of} = {base}")


def check_config(config) -> None:
    """Sizes, layer types, rotary settings and MoE sizes of a transformers Qwen3-Next / Qwen3.5 config."""
    c = config.get_text_config()
    require_positive(c, "vocab_size", "hidden_size", "num_hidden_layers")
    types = list(getattr(c, "layer_types", None) or [])
    if len(types) != c.num_hidden_layers:
        raise ValueError(f"layer_types has {len(types)} entries, num_hidden_layers = {c.num_hidden_layers}")
    bad = [(i, t) for i, t in enumerate(types) if t not in LAYER_TYPES]
    if bad:
        raise ValueError(f"layer_types[{bad[0][0]}] = {bad[0][1]!r}; allowed: {LAYER_TYPES}")
    if c.hidden_act not in ACTIVATIONS:
        raise ValueError(f"hidden_act {c.hidden_act!r} is not supported; supported: {sorted(ACTIVATIONS)}")
    if LINEAR_ATTENTION in types:
        require_positive(
            c, "linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim", "linear_value_head_dim",
            "linear_conv_kernel_dim",
        )  # fmt: skip
        # NOTE: GVA: each key head serves linear_num_value_heads / linear_num_key_heads value heads.
        _multiple(c, "linear_num_value_heads", "linear_num_key_heads")
    if FULL_ATTENTION in types:
        require_positive(c, "num_attention_heads", "num_key_value_heads", "head_dim")
        _multiple(c, "num_attention_heads", "num_key_value_heads")
        params = getattr(c, "rope_parameters", None) or {}
        rope_type = params.get("rope_type", "default")
        if rope_type != "default":
            raise ValueError(f"rope_parameters.rope_type {rope_type!r} is not supported; supported: 'default'")
        _, factor = rope_settings(c)
        rotary_dim = int(c.head_dim * factor)
        if not 0 < factor <= 1 or rotary_dim < 2 or rotary_dim % 2:
            raise ValueError(
                f"partial_rotary_factor = {factor} gives {rotary_dim} rotary channels of head_dim {c.head_dim}; "
                "it must be in (0, 1] and give an even number >= 2"
            )
    num_experts = getattr(c, "num_experts", 0) or 0
    if num_experts:
        require_positive(c, "num_experts_per_tok", "moe_intermediate_size")
        if c.num_experts_per_tok > num_experts:
            raise ValueError(f"num_experts_per_tok = {c.num_experts_per_tok} exceeds num_experts = {num_experts}")
    if getattr(c, "intermediate_size", None) is not None:
        require_positive(c, "intermediate_size")
