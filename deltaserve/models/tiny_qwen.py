"""Tiny random Qwen3-Next / Qwen3.5 configs and their checkpoint tensor names, for ``make-tiny --arch``.

Sizes keep what the real models have and a naive implementation would get wrong: GVA (4 value heads
on 2 key heads), key and value heads of different widths, rotary on half of each attention head,
GQA (4 query heads on 2 KV heads), both GDN projection layouts (Qwen3-Next's fused per-key-head
``in_proj_qkvz`` / ``in_proj_ba``; Qwen3.5's split ones), per-expert and fused expert tensors. The
names are listed here from the config dict, not from the model classes, so loading checks them.
"""

from __future__ import annotations

import copy

import torch

from deltaserve.models.tiny import NUM_BYTE_TOKENS, VOCAB_SIZE

_COMMON = {
    "vocab_size": VOCAB_SIZE,
    "hidden_size": 64,
    "num_hidden_layers": 4,
    "layer_types": ["linear_attention", "linear_attention", "full_attention", "linear_attention"],
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
    "linear_num_key_heads": 2,
    "linear_num_value_heads": 4,
    "linear_key_head_dim": 16,
    "linear_value_head_dim": 8,
    "linear_conv_kernel_dim": 4,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-06,
    "max_position_embeddings": 4096,
    "tie_word_embeddings": False,
    "bos_token_id": NUM_BYTE_TOKENS,
    "eos_token_id": NUM_BYTE_TOKENS + 1,
    "pad_token_id": NUM_BYTE_TOKENS + 2,
    "dtype": "float32",
}
_MOE = {"num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32}

CONFIGS = {
    # NOTE: layer 0 dense (mlp_only_layers) so that both feed-forward kinds are exercised.
    "qwen3_next": {
        "architectures": ["Qwen3NextForCausalLM"], "model_type": "qwen3_next", **_COMMON, **_MOE,
        "intermediate_size": 96, "decoder_sparse_step": 1, "mlp_only_layers": [0], "norm_topk_prob": True,
    },
    "qwen3_5": {
        "architectures": ["Qwen3_5ForCausalLM"], "model_type": "qwen3_5_text", **_COMMON, "intermediate_size": 96,
    },
    "qwen3_5_moe": {"architectures": ["Qwen3_5MoeForCausalLM"], "model_type": "qwen3_5_moe_text", **_COMMON, **_MOE},
}  # fmt: skip


def tiny_qwen_config_dict(arch: str, overrides: dict | None = None) -> dict:
    config = copy.deepcopy(CONFIGS[arch])
    config.update(overrides or {})
    return config


def _gdn_shapes(config: dict, p: str, hidden: int) -> dict[str, tuple[int, ...]]:
    hk, hv = config["linear_num_key_heads"], config["linear_num_value_heads"]
    key, value = hk * config["linear_key_head_dim"], hv * config["linear_value_head_dim"]
    conv = 2 * key + value
    shapes = {
        f"{p}conv1d.weight": (conv, 1, config["linear_conv_kernel_dim"]),
        f"{p}A_log": (hv,),
        f"{p}dt_bias": (hv,),
        f"{p}norm.weight": (config["linear_value_head_dim"],),
        f"{p}out_proj.weight": (hidden, value),
    }
    if config["model_type"] == "qwen3_next":
        shapes[f"{p}in_proj_qkvz.weight"] = (conv + value, hidden)
        shapes[f"{p}in_proj_ba.weight"] = (2 * hv, hidden)
    else:
        shapes[f"{p}in_proj_qkv.weight"] = (conv, hidden)
        shapes[f"{p}in_proj_z.weight"] = (value, hidden)
        shapes[f"{p}in_proj_b.weight"] = (hv, hidden)
        shapes[f"{p}in_proj_a.weight"] = (hv, hidden)
    return shapes


def _is_moe(config: dict, i: int) -> bool:
    if config["model_type"] == "qwen3_5_text":
        return False
    if config["model_type"] == "qwen3_5_moe_text":
        return True
    step = config.get("decoder_sparse_step", 1)
    return i not in config.get("mlp_only_layers", []) and config["num_experts"] > 0 and (i + 1) % step == 0


def _mlp_shapes(p: str, hidden: int, inter: int) -> dict[str, tuple[int, ...]]:
    return {f"{p}gate_proj.weight": (inter, hidden), f"{p}up_proj.weight": (inter, hidden), f"{p}down_proj.weight": (hidden, inter)}


def qwen_checkpoint_shapes(config: dict, fused_experts: bool = False) -> dict[str, tuple[int, ...]]:
    """Checkpoint tensor name -> shape of a tiny Qwen config dict (experts fused or per expert)."""
    hidden, head_dim = config["hidden_size"], config["head_dim"]
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    shapes = {"model.embed_tokens.weight": (config["vocab_size"], hidden)}
    for i, layer_type in enumerate(config["layer_types"]):
        p = f"model.layers.{i}."
        if layer_type == "linear_attention":
            shapes.update(_gdn_shapes(config, f"{p}linear_attn.", hidden))
        else:
            a = f"{p}self_attn."
            shapes.update({
                f"{a}q_proj.weight": (2 * heads * head_dim, hidden), f"{a}k_proj.weight": (kv_heads * head_dim, hidden),
                f"{a}v_proj.weight": (kv_heads * head_dim, hidden), f"{a}o_proj.weight": (hidden, heads * head_dim),
                f"{a}q_norm.weight": (head_dim,), f"{a}k_norm.weight": (head_dim,),
            })  # fmt: skip
        if _is_moe(config, i):
            m, experts, inter = f"{p}mlp.", config["num_experts"], config["moe_intermediate_size"]
            shapes[f"{m}gate.weight"] = (experts, hidden)
            if fused_experts:
                shapes[f"{m}experts.gate_up_proj"] = (experts, 2 * inter, hidden)
                shapes[f"{m}experts.down_proj"] = (experts, hidden, inter)
            else:
                for e in range(experts):
                    shapes.update(_mlp_shapes(f"{m}experts.{e}.", hidden, inter))
            shapes.update(_mlp_shapes(f"{m}shared_expert.", hidden, config["shared_expert_intermediate_size"]))
            shapes[f"{m}shared_expert_gate.weight"] = (1, hidden)
        else:
            shapes.update(_mlp_shapes(f"{p}mlp.", hidden, config["intermediate_size"]))
        shapes[f"{p}input_layernorm.weight"] = (hidden,)
        shapes[f"{p}post_attention_layernorm.weight"] = (hidden,)
    shapes["model.norm.weight"] = (hidden,)
    shapes["lm_head.weight"] = (config["vocab_size"], hidden)
    return shapes


def mtp_checkpoint_shapes(config: dict, fused_experts: bool = False) -> dict[str, tuple[int, ...]]:
    """The ``mtp.*`` head of Qwen3-Next / Qwen3.5 checkpoints: ``fc`` over ``[embedding; hidden]``, its two
    pre-norms, one full-attention decoder layer (MoE as the model's layers), a final norm."""
    hidden, index = config["hidden_size"], config["num_hidden_layers"]
    one_layer = dict(config, layer_types=list(config["layer_types"]) + ["full_attention"])
    layer = f"model.layers.{index}."
    shapes = {
        "mtp." + name[len("model."):].replace(f"layers.{index}.", "layers.0."): shape
        for name, shape in qwen_checkpoint_shapes(one_layer, fused_experts).items()
        if name.startswith(layer)
    }
    shapes["mtp.fc.weight"] = (hidden, 2 * hidden)
    for norm in ("pre_fc_norm_embedding", "pre_fc_norm_hidden", "norm"):
        shapes[f"mtp.{norm}.weight"] = (hidden,)
    return shapes


def init_qwen_tensor(name: str, shape: tuple[int, ...], gen: torch.Generator, base_init) -> torch.Tensor:
    """Zero-centred norms get small random ``w`` (so ``1 + w`` differs from ``w``), the GDN output norm
    ``1 + noise``; everything else as the Kimi tiny model (``base_init``)."""
    if name.endswith("linear_attn.norm.weight"):
        return 1 + 0.1 * torch.randn(shape, generator=gen)
    if name.endswith("norm.weight"):
        return 0.1 * torch.randn(shape, generator=gen)
    return base_init(name, shape, gen)
