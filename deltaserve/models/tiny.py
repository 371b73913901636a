"""Built-in tiny random checkpoints in the real formats, for tests, demos and ``make run``.

``make_tiny(dir)`` writes config.json (the layout of moonshotai/Kimi-Linear-48B-A3B's, tiny sizes),
model.safetensors (checkpoint names, float32) and a byte-level BPE tokenizer that
``AutoTokenizer.from_pretrained`` loads; ``arch="qwen3_next" | "qwen3_5" | "qwen3_5_moe"`` writes a
tiny Qwen3-Next / Qwen3.5 checkpoint instead (:mod:`deltaserve.models.tiny_qwen`), with the same
tokenizer. The tensors are listed here from the config dict itself, not
from the model class, so loading it checks the model's names independently.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from deltaserve.models.tiny_tokenizer import NUM_BYTE_TOKENS, make_tokenizer

TINY_VERSION = 3  # bump when the tiny checkpoint changes, so cached copies are rebuilt
VOCAB_SIZE = 320  # 256 bytes + 3 special tokens, rounded up to a multiple of 64

_TINY_CONFIG = {
    "architectures": ["KimiLinearForCausalLM"],
    "model_type": "kimi_linear",
    "vocab_size": VOCAB_SIZE,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-05,
    "tie_word_embeddings": False,
    "model_max_length": 4096,
    "use_cache": True,
    "q_lora_rank": None,
    "kv_lora_rank": 32,
    "qk_nope_head_dim": 16,
    "qk_rope_head_dim": 8,
    "v_head_dim": 16,
    "mla_use_nope": True,
    "num_experts": 8,
    "num_experts_per_token": 2,
    "num_shared_experts": 1,
    "moe_intermediate_size": 32,
    "moe_router_activation_func": "sigmoid",
    "moe_renormalize": True,
    "routed_scaling_factor": 2.446,
    "use_grouped_topk": True,
    # NOTE: 2 groups with 1 kept (the 48B model has 1/1), so that grouped routing is exercised.
    "num_expert_group": 2,
    "topk_group": 1,
    "first_k_dense_replace": 1,
    "moe_layer_freq": 1,
    "num_nextn_predict_layers": 0,
    "bos_token_id": NUM_BYTE_TOKENS,
    "eos_token_id": NUM_BYTE_TOKENS + 1,
    "pad_token_id": NUM_BYTE_TOKENS + 2,
    "dtype": "float32",
    "torch_dtype": "float32",
    "linear_attn_config": {
        "head_dim": 16,
        "num_heads": 2,
        "short_conv_kernel_size": 4,
        "kda_layers": [1, 2, 4],
        "full_attn_layers": [3],
    },
}


def tiny_config_dict(overrides: dict | None = None) -> dict:
    """The tiny config.json as a dict; ``overrides`` replace top-level keys (``linear_attn_config`` is merged)."""
    config = copy.deepcopy(_TINY_CONFIG)
    for key, value in (overrides or {}).items():
        if key == "linear_attn_config":
            config[key].update(value)
        else:
            config[key] = value
    return config


def checkpoint_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Checkpoint tensor name -> shape of a Kimi-Linear config.json dict (real checkpoint names)."""
    hidden = config["hidden_size"]
    lin = config["linear_attn_config"]
    heads, head_dim, kernel = lin["num_heads"], lin["head_dim"], lin["short_conv_kernel_size"]
    width = heads * head_dim
    mla_heads, q_rank, kv_rank = config["num_attention_heads"], config["q_lora_rank"], config["kv_lora_rank"]
    nope, rope, v_dim = config["qk_nope_head_dim"], config["qk_rope_head_dim"], config["v_head_dim"]
    experts, moe_inter = config["num_experts"], config["moe_intermediate_size"]
    shared_inter = moe_inter * config["num_shared_experts"]
    shapes = {"model.embed_tokens.weight": (config["vocab_size"], hidden)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        if i + 1 in lin["kda_layers"]:
            for name in ("q_proj", "k_proj", "v_proj"):
                shapes[f"{p}self_attn.{name}.weight"] = (width, hidden)
                shapes[f"{p}self_attn.{name[0]}_conv1d.weight"] = (width, 1, kernel)
            shapes[f"{p}self_attn.A_log"] = (1, 1, heads, 1)
            shapes[f"{p}self_attn.dt_bias"] = (width,)
            for gate in ("f", "g"):
                shapes[f"{p}self_attn.{gate}_a_proj.weight"] = (head_dim, hidden)
                shapes[f"{p}self_attn.{gate}_b_proj.weight"] = (width, head_dim)
            shapes[f"{p}self_attn.b_proj.weight"] = (heads, hidden)
            shapes[f"{p}self_attn.o_norm.weight"] = (head_dim,)
            shapes[f"{p}self_attn.o_proj.weight"] = (hidden, width)
        else:
            if q_rank is None:
                shapes[f"{p}self_attn.q_proj.weight"] = (mla_heads * (nope + rope), hidden)
            else:
                shapes[f"{p}self_attn.q_a_proj.weight"] = (q_rank, hidden)
                shapes[f"{p}self_attn.q_a_layernorm.weight"] = (q_rank,)
                shapes[f"{p}self_attn.q_b_proj.weight"] = (mla_heads * (nope + rope), q_rank)
            shapes[f"{p}self_attn.kv_a_proj_with_mqa.weight"] = (kv_rank + rope, hidden)
            shapes[f"{p}self_attn.kv_a_layernorm.weight"] = (kv_rank,)
            shapes[f"{p}self_attn.kv_b_proj.weight"] = (mla_heads * (nope + v_dim), kv_rank)
            shapes[f"{p}self_attn.o_proj.weight"] = (hidden, mla_heads * v_dim)
        if i < config["first_k_dense_replace"]:
            mlp, inter = f"{p}mlp.", config["intermediate_size"]
        else:
            moe = f"{p}block_sparse_moe."
            shapes[f"{moe}gate.weight"] = (experts, hidden)
            shapes[f"{moe}gate.e_score_correction_bias"] = (experts,)
            for e in range(experts):
                shapes[f"{moe}experts.{e}.w1.weight"] = (moe_inter, hidden)
                shapes[f"{moe}experts.{e}.w3.weight"] = (moe_inter, hidden)
                shapes[f"{moe}experts.{e}.w2.weight"] = (hidden, moe_inter)
            mlp, inter = f"{moe}shared_experts.", shared_inter
        shapes[f"{mlp}gate_proj.weight"] = (inter, hidden)
        shapes[f"{mlp}up_proj.weight"] = (inter, hidden)
        shapes[f"{mlp}down_proj.weight"] = (hidden, inter)
        shapes[f"{p}input_layernorm.weight"] = (hidden,)
        shapes[f"{p}post_attention_layernorm.weight"] = (hidden,)
    shapes["model.norm.weight"] = (hidden,)
    shapes["lm_head.weight"] = (config["vocab_size"], hidden)
    return shapes


def _init_tensor(name: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """Random weights that keep activations of order one (so that outputs are not degenerate)."""
    if name.endswith("A_log"):
        return torch.empty(shape).uniform_(1.0, 16.0, generator=gen).log()
    if name.endswith("dt_bias"):
        # fla's init: dt log-uniform in [1e-3, 1e-1], stored as softplus^-1(dt) = dt + log(-expm1(-dt))
        dt = torch.empty(shape).uniform_(math.log(1e-3), math.log(1e-1), generator=gen).exp().clamp_min(1e-4)
        return dt + torch.log(-torch.expm1(-dt))
    if name.endswith("e_score_correction_bias"):
        return torch.randn(shape, generator=gen) * 0.02
    if "norm" in name.rsplit(".", 2)[-2]:
        return torch.ones(shape)
    if name.endswith("embed_tokens.weight"):
        return torch.randn(shape, generator=gen)
    if name == "lm_head.weight":
        # NOTE: logits of std ~2.4 (the final hidden state has unit RMS): a peaked next-token
        # distribution, so greedy choices have clear margins, also in bfloat16.
        return torch.randn(shape, generator=gen) * 0.3
    if "conv1d" in name:
        return torch.randn(shape, generator=gen) * 0.3
    return torch.randn(shape, generator=gen) * 0.1


ARCHS = ("kimi_linear", "qwen3_next", "qwen3_5", "qwen3_5_moe")


def arch_config_dict(arch: str = "kimi_linear", overrides: dict | None = None) -> dict:
    """The tiny config.json dict of ``arch`` (one of :data:`ARCHS`)."""
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {', '.join(ARCHS)}; got {arch!r}")
    if arch == "kimi_linear":
        return tiny_config_dict(overrides)
    from deltaserve.models.tiny_qwen import tiny_qwen_config_dict

    return tiny_qwen_config_dict(arch, overrides)


def random_weights(config: dict, seed: int = 0, fused_experts: bool = False) -> dict[str, torch.Tensor]:
    """Deterministic float32 weights for every checkpoint tensor of ``config`` (Qwen MoE experts fused
    into ``gate_up_proj`` / ``down_proj`` when ``fused_experts``)."""
    gen = torch.Generator().manual_seed(seed)
    if config["model_type"] == "kimi_linear":
        shapes, init = checkpoint_shapes(config), _init_tensor
    else:
        from deltaserve.models.tiny_qwen import init_qwen_tensor, mtp_checkpoint_shapes, qwen_checkpoint_shapes

        shapes = qwen_checkpoint_shapes(config, fused_experts)
        # NOTE: the MTP head as the releases carry it: skipped by the model's loader, loaded by the MTP drafter.
        shapes.update(mtp_checkpoint_shapes(config, fused_experts))

        def init(name, shape, gen):
            return init_qwen_tensor(name, shape, gen, _init_tensor)

    return {name: init(name, shapes[name], gen).contiguous() for name in sorted(shapes)}


def make_tiny(
    path: str | os.PathLike,
    seed: int = 0,
    overrides: dict | None = None,
    arch: str = "kimi_linear",
    fused_experts: bool | None = None,
) -> Path:
    """Write the tiny checkpoint (config.json, model.safetensors, tokenizer files) into ``path``; returns it.

    The same ``seed`` and ``overrides`` give the same bytes. ``overrides`` replace config keys (see
    :func:`tiny_config_dict`), e.g. ``{"q_lora_rank": 16}``. ``fused_experts`` (Qwen MoE; default:
    fused for ``qwen3_5_moe``, per expert for ``qwen3_next``) picks the expert tensor format.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = arch_config_dict(arch, overrides)
    if fused_experts is None:
        fused_experts = arch == "qwen3_5_moe"
    tokenizer = make_tokenizer()
    if len(tokenizer) > config["vocab_size"]:
        raise ValueError(f"vocab_size = {config['vocab_size']} is smaller than the tokenizer's {len(tokenizer)} tokens")
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    weights = random_weights(config, seed, fused_experts)
    save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(str(path))
    (path / "deltaserve_tiny.json").write_text(json.dumps({"version": TINY_VERSION, "seed": seed}) + "\n")
    return path


def default_cache_dir() -> Path:
    """``$DELTASERVE_CACHE`` or ``~/.cache/deltaserve``."""
    return Path(os.environ.get("DELTASERVE_CACHE") or Path.home() / ".cache" / "deltaserve").expanduser()


def default_tiny_model() -> Path:
    """The built-in tiny checkpoint (seed 0) in ``<cache>/tiny-kimi-linear``, written once.

    NOTE: written to a temporary folder beside it, then renamed, so that concurrent callers never
    see a half-written checkpoint.
    """
    target = default_cache_dir() / "tiny-kimi-linear"
    stamp = target / "deltaserve_tiny.json"
    if stamp.is_file() and json.loads(stamp.read_text()).get("version") == TINY_VERSION:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-kimi-linear-", dir=target.parent))
    try:
        make_tiny(tmp, seed=0)
        if target.exists():  # an outdated version: move it aside first
            stale = Path(tempfile.mkdtemp(prefix=".stale-", dir=target.parent))
            os.rename(target, stale / "old")
            shutil.rmtree(stale, ignore_errors=True)
        os.rename(tmp, target)
    except OSError:
        # another process renamed its copy in first
        if not stamp.is_file():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
