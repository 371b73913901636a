"""A Kimi-Linear-shaped model with random weights, made on the device, and transformers' twin of it.

The dimensions are those of ``tests/data/kimi-linear-48b-a3b-config.json`` (hidden 2304, 27 layers:
20 KDA with 32 heads x 128 and 7 MLA, vocab 163840) except the number of routed experts (32 instead
of 256, so that two copies of the weights are not needed and it fits one card: about 7.7 B
parameters, 15.5 GB in bf16). No checkpoint is written: our model is built on the meta device,
given storage on the target device and initialised in place; transformers' ``KimiLinearForCausalLM``
then gets the *same* tensors (shared storage) under its own names (a merged projection's blocks as
views of its rows).

    python benchmarks/make_kimi_shaped.py        # builds both on cuda, compares their logits
"""

from __future__ import annotations

import json
import math
import re
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
CONFIG_48B = REPO / "tests" / "data" / "kimi-linear-48b-a3b-config.json"
INIT_STD = 0.02  # transformers' initializer_range
# Small dimensions for a dry run on the CPU (same layer pattern kinds: KDA, MLA, dense MLP, MoE).
SMALL_OVERRIDES = {
    "hidden_size": 256, "intermediate_size": 512, "moe_intermediate_size": 128, "num_hidden_layers": 4,
    "vocab_size": 1024, "pad_token_id": 1000, "bos_token_id": 1001, "eos_token_id": 1002,
    "num_attention_heads": 4, "kv_lora_rank": 64, "qk_nope_head_dim": 32, "qk_rope_head_dim": 16, "v_head_dim": 32,
    "linear_attn_config": {"head_dim": 32, "num_heads": 4, "short_conv_kernel_size": 4, "kda_layers": [1, 2, 3],
                           "full_attn_layers": [4]},
}  # fmt: skip


LABEL = "Kimi-Linear-shaped"
# Ours vs transformers in float32 on the real dimensions cut to 4 layers (KDA x3, MLA, dense MLP, MoE).
FP32_OVERRIDES = {"num_hidden_layers": 4, "linear_attn_config": {
    "head_dim": 128, "num_heads": 32, "short_conv_kernel_size": 4, "kda_layers": [1, 2, 3], "full_attn_layers": [4]}}


def write_config(
    directory: str | Path, num_experts: int = 32, overrides: dict | None = None, base: Path = CONFIG_48B
) -> Path:
    """Write the ``base`` config (default: the 48B's) with ``num_experts`` routed experts (and ``overrides``)
    as ``directory/config.json``."""
    raw = json.loads(Path(base).read_text())
    raw["num_experts"] = num_experts
    raw["dtype"] = "bfloat16"
    raw.update(overrides or {})
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(raw, indent=2))
    return directory


@torch.no_grad()
def init_random_(model: torch.nn.Module, seed: int = 0, std: float = INIT_STD) -> None:
    """Checkpoint-like random values in place: N(0, std) matrices, unit norms, KDA decay parameters as
    transformers initialises them (A in [1, 16], dt in [1e-3, 1e-1]), zero router bias."""
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, param in model.named_parameters():
        if name.endswith("A_log"):
            param.uniform_(1, 16, generator=gen).log_()
        elif name.endswith("dt_bias"):
            dt = torch.empty_like(param).uniform_(math.log(1e-3), math.log(1e-1), generator=gen).exp()
            param.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        elif name.endswith("e_score_correction_bias"):
            param.zero_()
        elif param.dim() == 1:  # RMSNorm weights
            param.fill_(1.0)
        else:
            param.normal_(0.0, std, generator=gen)


def make_model(
    config_dir: str | Path, dtype: torch.dtype = torch.bfloat16, device: str = "cuda", seed: int = 0, init=None
):
    """Our model of ``config_dir/config.json`` (by its architecture), random weights (``init``, default
    :func:`init_random_`), built on ``device``."""
    from deltaserve.models.loader import load_model_config
    from deltaserve.models.registry import resolve

    hf_config = load_model_config(config_dir)
    with torch.device("meta"):
        model = resolve(hf_config)(hf_config, dtype)
    model = model.to_empty(device=device)
    model.tie_weights()
    (init or init_random_)(model, seed)
    return model.eval().requires_grad_(False)


def checkpoint_parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Our parameters under the checkpoint's names, sharing storage: a merged projection (``MergedLinear``)
    appears as its blocks' rows (views), as in ``state_dict``; buffers are left out, a tied weight is
    named once."""
    buffers = {name for name, _ in model.named_buffers()}
    params, seen = {}, set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        if name not in buffers and id(tensor) not in seen:
            seen.add(id(tensor))
            params[name] = tensor.detach()
    return params


def transformers_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Our parameters under transformers' names (its conversion_mapping for kimi_linear, in reverse):
    the forget-gate weights move under ``forget_gate``, ``block_sparse_moe`` becomes ``mlp``, stacked
    experts become ``gate_up_proj`` / ``down_proj`` (same layout, shared), q/k/v convs are concatenated."""
    state: dict[str, torch.Tensor] = {}
    convs: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in checkpoint_parameters(model).items():
        name = re.sub(r"self_attn\.(f_a_proj|f_b_proj|dt_bias|A_log)", r"self_attn.forget_gate.\1", name)
        name = name.replace(".block_sparse_moe.", ".mlp.")
        name = name.replace("experts.w13_weight", "experts.gate_up_proj")
        name = name.replace("experts.w2_weight", "experts.down_proj")
        conv = re.fullmatch(r"(.*\.self_attn)\.([qkv])_conv1d\.weight", name)
        if conv:
            convs.setdefault(conv.group(1), {})[conv.group(2)] = tensor
        else:
            state[name] = tensor
    for prefix, parts in convs.items():
        state[f"{prefix}.conv1d.weight"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return state


def make_transformers_twin(model: torch.nn.Module, experts_implementation: str | None = None):
    """transformers' ``KimiLinearForCausalLM`` of ``model.config`` holding ``model``'s tensors (no copy
    except the concatenated convs; the merged projections' blocks are views); raises when a transformers
    weight is left without a value."""
    from transformers import KimiLinearForCausalLM as HFKimiLinear

    config = model.config
    if experts_implementation is not None:
        config._experts_implementation = experts_implementation
    with torch.device("meta"):
        ref = HFKimiLinear(config)
    result = ref.load_state_dict(transformers_state_dict(model), strict=False, assign=True)
    left = [n for n, t in list(ref.named_parameters()) + list(ref.named_buffers()) if t.is_meta]
    if result.unexpected_keys or left:
        raise RuntimeError(f"transformers twin: unexpected {result.unexpected_keys[:5]}, unset {left[:5]}")
    return ref.eval().requires_grad_(False)


def main() -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        overrides = {} if device == "cuda" else SMALL_OVERRIDES
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        model = make_model(write_config(tmp, overrides=overrides), dtype=dtype, device=device)
    ref = make_transformers_twin(model)
    params = sum(p.numel() for p in model.parameters())
    print(f"Kimi-Linear-shaped model on {device}: {params / 1e9:.2f} B parameters; experts: "
          f"{ref.config._experts_implementation}")
    from deltaserve.forward_context import forward_context, make_forward_context
    from deltaserve.state.pool import StatePool

    # One prompt through both, ours driven as the engine does (pool, paged cache, one context).
    num_tokens, block_size = 64, 16
    ids = torch.randint(0, model.config.vocab_size, (num_tokens,), device=device)
    pool = StatePool(model.state_groups(), 2, device=device)
    spec = model.kv_cache_spec()
    kv = torch.zeros(spec.num_layers, 8, block_size, spec.entry_dim, dtype=spec.dtype, device=device)
    model.bind_caches(pool, kv)
    ctx = make_forward_context([num_tokens], [0], [1], block_tables=[[0, 1, 2, 3]], block_size=block_size,
                               device=device)
    with torch.inference_mode(), forward_context(ctx):
        ours = model.compute_logits(model(ids, torch.arange(num_tokens, device=device)))
        theirs = ref(ids[None], use_cache=False).logits[0].float()
    err = ((ours - theirs).norm() / theirs.norm()).item()
    print(f"logits rel err ours vs transformers ({dtype}): {err:.2e}")
    sys.exit(0 if err < 5e-2 else 1)


if __name__ == "__main__":
    main()
