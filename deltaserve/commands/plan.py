"""``deltaserve plan``: per-request state bytes and per-token KV bytes of a model, per TP rank."""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from deltaserve.state.layout import CONV_LAYOUTS, StateLayout, divide, kda_layout, resolve_dtype

HELP = "Print the state and KV-cache memory a model needs per request and per token (one TP rank)."

SUPPORTED_MODEL_TYPES = ("kimi_linear", "qwen3_next", "qwen3_5_text", "qwen3_5_moe_text", "qwen3_5", "qwen3_5_moe")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", default=None, help="config.json or a checkpoint dir (default: the built-in tiny model)"
    )
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    parser.add_argument("--num-requests", type=int, default=64, help="requests whose states are held at once")
    parser.add_argument("--cache-dtype", default="auto", help="state/KV cache dtype: auto (= model dtype) or a name")
    parser.add_argument(
        "--mamba-ssm-cache-dtype", "--ssm-dtype", dest="ssm_dtype", default="auto",
        help="GDN recurrent dtype, as the engine's setting: auto (= config's mamba_ssm_dtype, else float32) or a name",
    )  # fmt: skip
    parser.add_argument(
        "--num-spec", type=int, default=0, help="speculative tokens (conv state_len = K - 1 + num_spec)"
    )
    parser.add_argument("--conv-layout", default="SD", choices=CONV_LAYOUTS, help="conv state orientation")


def default_config_dict() -> dict:
    """The built-in tiny Kimi-Linear model's config.json."""
    from deltaserve.models.tiny import tiny_config_dict

    return tiny_config_dict()


def load_config_dict(path: str | None) -> tuple[dict, str]:
    """The config dict and where it came from (a file, ``<dir>/config.json`` or the tiny model)."""
    if path is None:
        return default_config_dict(), "built-in tiny model"
    file = Path(path)
    if file.is_dir():
        file = file / "config.json"
    if not file.is_file():
        raise ValueError(f"--config {path}: no such file (expected config.json or a checkpoint dir holding one)")
    try:
        return json.loads(file.read_text()), str(file)
    except json.JSONDecodeError as exc:
        raise ValueError(f"--config {file}: not valid JSON ({exc})") from None


def parse_config(config: dict):
    """A transformers config object for a supported ``model_type`` (the text config of a vision-language one)."""
    from transformers import AutoConfig

    config = dict(config)
    model_type = config.pop("model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"model_type {model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecation notes about fields such as rope_scaling
        return AutoConfig.for_model(model_type, **config).get_text_config()


@dataclass
class LinearGroup:
    kind: str
    num_layers: int
    layout: StateLayout


@dataclass
class AttentionGroup:
    kind: str
    num_layers: int
    bytes_per_token: int  # per layer, one rank
    note: str


@dataclass
class Plan:
    model_type: str
    model_dtype: torch.dtype
    model_dtype_note: str
    linear: list[LinearGroup]
    attention: list[AttentionGroup]


def make_plan(
    config,
    *,
    tp: int = 1,
    cache_dtype: str = "auto",
    ssm_dtype: str = "auto",
    num_spec: int = 0,
    conv_layout: str = "SD",
) -> Plan:
    """Layouts of the linear layers and KV bytes of the full-attention layers on one of ``tp`` ranks."""
    if tp < 1:
        raise ValueError(f"--tp must be >= 1, got {tp}")
    raw_dtype = getattr(config, "dtype", None)
    if raw_dtype is None:
        model_dtype, note = torch.bfloat16, "not in config.json, assumed"
    else:
        name = raw_dtype if isinstance(raw_dtype, torch.dtype) else str(raw_dtype)
        model_dtype, note = resolve_dtype(name, torch.bfloat16, "config.json dtype"), "from config.json"
    kv_dtype = resolve_dtype(cache_dtype, model_dtype, "--cache-dtype")
    layer_types = list(config.layer_types)
    num_linear = layer_types.count("linear_attention")
    num_full = layer_types.count("full_attention")
    common = dict(
        tp_size=tp, num_spec=num_spec, conv_layout=conv_layout, model_dtype=model_dtype, cache_dtype=cache_dtype
    )
    if config.model_type == "kimi_linear":
        layout = kda_layout(
            config.linear_num_heads, config.linear_head_dim, conv_kernel_size=config.linear_conv_kernel_dim, **common
        )
        linear = [LinearGroup("kda", num_linear, layout)]
        divide(config.num_attention_heads, tp, "MLA num_attention_heads")
        latent = config.kv_lora_rank + config.qk_rope_head_dim
        attention = [
            AttentionGroup(
                "mla",
                num_full,
                latent * kv_dtype.itemsize,
                f"latent kv_lora_rank {config.kv_lora_rank} + qk_rope_head_dim {config.qk_rope_head_dim} = {latent} "
                "values; replicated on every TP rank, so not divided by TP",
            )
        ]
    else:  # Qwen3-Next / Qwen3.5: the engine's recurrent dtype rule
        from deltaserve.models.qwen_config import gdn_layout_of

        layout = gdn_layout_of(config, mamba_ssm_cache_dtype=ssm_dtype, **common)
        linear = [LinearGroup("gdn", num_linear, layout)]
        divide(config.num_attention_heads, tp, "attention num_attention_heads")
        kv_heads = config.num_key_value_heads
        if kv_heads >= tp:
            local = divide(kv_heads, tp, "attention num_key_value_heads")
            how = f"{kv_heads} KV heads / tp {tp}"
        else:
            # NOTE: as in vLLM, fewer KV heads than ranks are replicated, one per rank.
            divide(tp, kv_heads, "tp_size over num_key_value_heads (for KV-head replication)")
            local, how = 1, f"{kv_heads} KV heads replicated to 1 per rank"
        attention = [
            AttentionGroup(
                "attention",
                num_full,
                2 * local * config.head_dim * kv_dtype.itemsize,
                f"K and V: {how}, head_dim {config.head_dim}",
            )
        ]
    return Plan(config.model_type, model_dtype, note, linear, attention)


def _n(value: int) -> str:
    return f"{value:,}"


def _dtype(dtype: torch.dtype | None) -> str:
    return "-" if dtype is None else str(dtype).removeprefix("torch.")


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  " + "  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip()]
    for row in rows:
        # Numbers right-aligned; the first column (kind) and a trailing note left-aligned.
        cells = [c.rjust(w) if any(ch.isdigit() for ch in c[:1]) else c.ljust(w) for c, w in zip(row, widths)]
        lines.append(("  " + "  ".join(cells)).rstrip())
    return lines


def format_plan(plan: Plan, *, source: str, tp: int, num_requests: int) -> str:
    first = plan.linear[0].layout if plan.linear else None
    lines = [
        f"model: {plan.model_type} ({source})",
        f"tp = {tp}, model dtype = {_dtype(plan.model_dtype)} ({plan.model_dtype_note}), "
        + (f"num_spec = {first.num_spec}, conv layout = {first.conv_layout}" if first else ""),
        "",
        "Linear-attention state per layer per request, bytes (one TP rank):",
    ]
    rows = []
    for g in plan.linear:
        lay = g.layout
        conv_shape = "x".join(map(str, lay.conv_shape))
        recurrent_shape = "x".join(map(str, lay.recurrent_shape or ())) or "-"
        rows.append(
            [g.kind, str(g.num_layers), conv_shape, _dtype(lay.conv_dtype), _n(lay.conv_bytes), recurrent_shape]
            + [_dtype(lay.recurrent_dtype), _n(lay.recurrent_bytes), _n(lay.bytes_per_slot)]
        )
    header = ["kind", "layers", "conv shape", "conv dtype", "conv", "recurrent shape", "rec dtype", "recurrent", "total"]
    lines += _table(header, rows)
    per_request = sum(g.num_layers * g.layout.bytes_per_slot for g in plan.linear)
    batch = per_request * num_requests
    lines += [
        "",
        f"All linear layers, per request: {_n(per_request)} bytes ({per_request / 2**20:,.2f} MiB)",
        f"All linear layers, {_n(num_requests)} requests: {_n(batch)} bytes ({batch / 2**30:,.3f} GiB)",
        "",
        "Full-attention KV cache per token, bytes (one TP rank):",
    ]
    rows = [
        [g.kind, str(g.num_layers), _n(g.bytes_per_token), _n(g.num_layers * g.bytes_per_token), g.note]
        for g in plan.attention
    ]
    lines += _table(["kind", "layers", "per layer", "all layers", "note"], rows)
    per_token = sum(g.num_layers * g.bytes_per_token for g in plan.attention)
    lines += ["", f"All full-attention layers, per token: {_n(per_token)} bytes"]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    try:
        if args.num_requests < 1:
            raise ValueError(f"--num-requests must be >= 1, got {args.num_requests}")
        config_dict, source = load_config_dict(args.config)
        config = parse_config(config_dict)
        plan = make_plan(
            config, tp=args.tp, cache_dtype=args.cache_dtype, ssm_dtype=args.ssm_dtype,
            num_spec=args.num_spec, conv_layout=args.conv_layout,
        )
    except (ValueError, TypeError) as exc:
        print(f"deltaserve plan: error: {exc}", file=sys.stderr)
        return 2
    print(format_plan(plan, source=source, tp=args.tp, num_requests=args.num_requests))
    return 0
