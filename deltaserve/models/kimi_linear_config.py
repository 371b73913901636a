"""Checks of a Kimi-Linear config.json before a model is built: each failure is a ValueError naming the field."""

from __future__ import annotations

LAYER_TYPES = ("linear_attention", "full_attention")
MLP_LAYER_TYPES = ("dense", "sparse")


def check_raw_config(raw: dict) -> None:
    """Checks of the config.json dict that transformers' ``KimiLinearConfig`` would not make.

    ``linear_attn_config.kda_layers`` / ``full_attn_layers`` are 1-based layer numbers; together
    they must name every layer exactly once (transformers indexes ``layer - 1`` without checks).
    """
    num_layers = raw.get("num_hidden_layers")
    if not isinstance(num_layers, int) or num_layers < 1:
        raise ValueError(f"num_hidden_layers must be a positive integer, got {num_layers!r}")
    linear = raw.get("linear_attn_config") or {}
    if "kda_layers" not in linear and "full_attn_layers" not in linear:
        return
    seen: dict[int, str] = {}
    for key in ("kda_layers", "full_attn_layers"):
        layers = linear.get(key, [])
        if not isinstance(layers, list):
            raise ValueError(f"linear_attn_config.{key} must be a list of 1-based layer numbers, got {layers!r}")
        for layer in layers:
            if not isinstance(layer, int) or not 1 <= layer <= num_layers:
                raise ValueError(
                    f"linear_attn_config.{key} has layer {layer!r}, out of range 1..{num_layers} "
                    f"(num_hidden_layers = {num_layers}; the numbers are 1-based)"
                )
            if layer in seen:
                raise ValueError(f"layer {layer} is listed in both linear_attn_config.{seen[layer]} and .{key}")
            seen[layer] = key
    uncovered = [n for n in range(1, num_layers + 1) if n not in seen]
    if uncovered:
        raise ValueError(
            f"layers {uncovered} (1-based) are in neither linear_attn_config.kda_layers nor .full_attn_layers; "
            f"together they must cover all {num_layers} layers"
        )


def require_positive(config, *names: str, allow_zero: bool = False) -> None:
    for name in names:
        value = getattr(config, name, None)
        low = 0 if allow_zero else 1
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


def check_config(config) -> None:
    """Sizes and layer lists of a transformers ``KimiLinearConfig``."""
    require_positive(config, "vocab_size", "hidden_size", "num_hidden_layers")
    n = config.num_hidden_layers
    for name, allowed in (("layer_types", LAYER_TYPES), ("mlp_layer_types", MLP_LAYER_TYPES)):
        types = list(getattr(config, name) or [])
        if len(types) != n:
            raise ValueError(f"{name} has {len(types)} entries, num_hidden_layers = {n}")
        bad = [(i, t) for i, t in enumerate(types) if t not in allowed]
        if bad:
            raise ValueError(f"{name}[{bad[0][0]}] = {bad[0][1]!r}; allowed: {allowed}")
    if "linear_attention" in config.layer_types:
        require_positive(config, "linear_num_heads", "linear_head_dim", "linear_conv_kernel_dim")
    if "full_attention" in config.layer_types:
        require_positive(config, "num_attention_heads", "kv_lora_rank", "qk_nope_head_dim", "v_head_dim")
        require_positive(config, "qk_rope_head_dim", allow_zero=True)
        if config.q_lora_rank is not None:
            require_positive(config, "q_lora_rank")
    if "dense" in config.mlp_layer_types:
        require_positive(config, "intermediate_size")
    if "sparse" in config.mlp_layer_types:
        require_positive(config, "num_experts", "num_experts_per_tok", "moe_intermediate_size", "n_group", "topk_group")
        require_positive(config, "n_shared_experts", allow_zero=True)
        experts, top_k, groups, topk_group = (
            config.num_experts,
            config.num_experts_per_tok,
            config.n_group,
            config.topk_group,
        )
        if top_k > experts:
            raise ValueError(f"num_experts_per_tok = {top_k} exceeds num_experts = {experts}")
        if experts % groups != 0:
            raise ValueError(f"num_experts = {experts} is not divisible by num_expert_group (n_group) = {groups}")
        if topk_group > groups:
            raise ValueError(f"topk_group = {topk_group} exceeds num_expert_group (n_group) = {groups}")
        if topk_group * (experts // groups) < top_k:
            raise ValueError(
                f"topk_group = {topk_group} groups of {experts // groups} experts cannot supply "
                f"num_experts_per_tok = {top_k} experts"
            )
