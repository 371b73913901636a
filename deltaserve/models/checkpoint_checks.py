"""Checks of a checkpoint before and while it loads, each a short ValueError naming the field or tensor.

- ``check_config_sizes``: the sizes in config.json are bounded before anything is allocated (a
  vocabulary of 10**10 would otherwise be a many-GB allocation, or a layer count an endless list).
- ``check_shard_path``: a sharded index may only name files inside the checkpoint folder.
- ``check_weight_dtype`` / ``check_finite``: weights are floating point and hold no NaN or inf.
"""

from __future__ import annotations

from pathlib import Path

import torch

# Upper bounds far above any published model (Kimi-Linear-48B: vocab 163840, hidden 2304, 27 layers,
# 256 experts; Qwen3-Next-80B: vocab 151936, 48 layers, 512 experts).
SIZE_LIMITS = {
    "vocab_size": 1 << 22,
    "hidden_size": 1 << 16,
    "intermediate_size": 1 << 20,
    "moe_intermediate_size": 1 << 20,
    "shared_expert_intermediate_size": 1 << 20,
    "num_hidden_layers": 1024,
    "num_attention_heads": 1024,
    "num_key_value_heads": 1024,
    "head_dim": 1 << 12,
    "num_experts": 1 << 14,
    "num_local_experts": 1 << 14,
    "n_routed_experts": 1 << 14,
    "num_experts_per_tok": 1 << 10,
    "n_shared_experts": 1 << 10,
    "n_group": 1 << 14,
    "topk_group": 1 << 14,
    "kv_lora_rank": 1 << 16,
    "q_lora_rank": 1 << 16,
    "qk_nope_head_dim": 1 << 12,
    "qk_rope_head_dim": 1 << 12,
    "v_head_dim": 1 << 12,
    "max_position_embeddings": 1 << 26,
    "linear_num_value_heads": 1024,
    "linear_num_key_heads": 1024,
    "linear_key_head_dim": 1 << 12,
    "linear_value_head_dim": 1 << 12,
    "linear_conv_kernel_dim": 64,
    "first_k_dense_replace": 1024,
    "full_attention_interval": 1024,
}
NESTED = ("linear_attn_config", "text_config")
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")


def check_config_sizes(raw: dict, prefix: str = "") -> None:
    """Every known size field (top level and in ``linear_attn_config`` / ``text_config``) is an
    integer in ``[0, limit]``; a null is left to the model's own checks."""
    for name, limit in SIZE_LIMITS.items():
        if name not in raw or raw[name] is None:
            continue
        value = raw[name]
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= limit:
            shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
            raise ValueError(f"config.json: {prefix}{name} must be an integer in [0, {limit}], got {shown}")
    for key in NESTED:
        if isinstance(raw.get(key), dict):
            check_config_sizes(raw[key], f"{prefix}{key}.")
    for key in ("num_heads", "head_dim", "short_conv_kernel_size"):
        nested = raw.get("linear_attn_config")
        if isinstance(nested, dict) and nested.get(key) is not None:
            value = nested[key]
            if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= 1 << 12:
                raise ValueError(f"config.json: linear_attn_config.{key} must be an integer in [1, 4096], got "
                                 f"{str(value)[:40]}")


def check_shard_path(folder: Path, shard: str) -> Path:
    """The shard file an index names, which must lie inside ``folder`` (no ``..``, no absolute path)."""
    index = folder / "model.safetensors.index.json"
    # NOTE: checked before the path is built: `folder / 5` is a TypeError, not a message naming the index.
    if not isinstance(shard, str):
        raise ValueError(f"{index} names shard {str(shard)[:200]}, which is not a file name (a string)")
    path = (folder / shard).resolve()
    if folder.resolve() not in path.parents:
        raise ValueError(f"{index} names shard {shard[:200]!r}, which is outside the checkpoint folder {folder}")
    return path


def check_weight_dtype(name: str, dtype: str) -> None:
    """``dtype``: safetensors' header spelling (``"BF16"``, ``"I64"``, ...)."""
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"tensor {name} has dtype {dtype}; model weights must be floating point ({', '.join(FLOAT_DTYPES)})")


def check_finite(name: str, tensor: torch.Tensor) -> None:
    if not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise ValueError(f"tensor {name} holds {bad} NaN or infinite value(s) of {tensor.numel()}")
