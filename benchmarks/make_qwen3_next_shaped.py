"""A Qwen3-Next-shaped model with random weights, made on the device, and transformers' twin of it.

The dimensions are those of ``tests/data/qwen3-next-80b-a3b-config.json`` (hidden 2048, 48 layers:
36 Gated DeltaNet with 16 key / 32 value heads of 128 and 12 gated attention with 16 heads on 2 KV
heads of 256, rotary on 25%; vocab 151936; 10 of the routed experts per token plus a gated shared
expert) except the number of routed experts (32 instead of 512, so that it fits one card: about
7.2 B parameters, 14.4 GB in bf16). No checkpoint is written: our model is built on the meta device
and initialised in place; transformers' ``Qwen3NextForCausalLM`` then gets the *same* tensors.

    python benchmarks/make_qwen3_next_shaped.py      # builds both on cuda, compares their logits
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_kimi_shaped  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONFIG_80B = REPO / "tests" / "data" / "qwen3-next-80b-a3b-config.json"
LABEL = "Qwen3-Next-shaped"
# Small dimensions for a dry run on the CPU (same kinds: GDN with GVA, gated attention, MoE).
SMALL_OVERRIDES = {
    "hidden_size": 256, "intermediate_size": 512, "moe_intermediate_size": 128, "shared_expert_intermediate_size": 128,
    "num_hidden_layers": 4, "vocab_size": 1024, "bos_token_id": 1001, "eos_token_id": 1002, "num_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 64, "linear_num_key_heads": 2, "linear_num_value_heads": 4,
    "linear_key_head_dim": 32, "linear_value_head_dim": 32, "num_experts_per_tok": 4,
}  # fmt: skip
# Ours vs transformers in float32 on the real dimensions cut to 4 layers (GDN x3, attention).
FP32_OVERRIDES = {"num_hidden_layers": 4}


def write_config(directory: str | Path, num_experts: int = 32, overrides: dict | None = None) -> Path:
    return make_kimi_shaped.write_config(directory, num_experts, overrides, base=CONFIG_80B)


@torch.no_grad()
def init_random_(model: torch.nn.Module, seed: int = 0, std: float = make_kimi_shaped.INIT_STD) -> None:
    """Checkpoint-like random values in place: N(0, std) matrices, zero-centred norms at 0 (scale 1), the
    GDN output norm at 1, decay parameters as transformers initialises them (A in [1, 16], dt_bias 1)."""
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, param in model.named_parameters():
        if name.endswith("A_log"):
            param.uniform_(1, 16, generator=gen).log_()
        elif name.endswith(("dt_bias", "linear_attn.norm.weight")):
            param.fill_(1.0)
        elif param.dim() == 1:  # zero-centred RMSNorm weights
            param.zero_()
        else:
            param.normal_(0.0, std, generator=gen)


def make_model(config_dir: str | Path, dtype: torch.dtype = torch.bfloat16, device: str = "cuda", seed: int = 0):
    """Our ``Qwen3NextForCausalLM`` of ``config_dir/config.json``, random weights, built on ``device``."""
    return make_kimi_shaped.make_model(config_dir, dtype, device, seed, init=init_random_)


def transformers_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Our parameters under transformers' names: the checkpoint's (merged projections' blocks as views of
    their rows), except the stacked experts, which are transformers' ``gate_up_proj`` / ``down_proj``
    (same layout, shared)."""
    state = {}
    for name, tensor in make_kimi_shaped.checkpoint_parameters(model).items():
        name = name.replace("experts.w13_weight", "experts.gate_up_proj")
        name = name.replace("experts.w2_weight", "experts.down_proj")
        state[name] = tensor
    return state


def make_transformers_twin(model: torch.nn.Module, experts_implementation: str | None = None):
    """transformers' ``Qwen3NextForCausalLM`` of ``model.config`` holding ``model``'s tensors (no copy);
    raises when a transformers weight is left without a value."""
    from transformers import Qwen3NextForCausalLM as HFQwen3Next

    config = model.config
    if experts_implementation is not None:
        config._experts_implementation = experts_implementation
    with torch.device("meta"):
        ref = HFQwen3Next(config)
    result = ref.load_state_dict(transformers_state_dict(model), strict=False, assign=True)
    left = [n for n, t in ref.named_parameters() if t.is_meta]
    if result.unexpected_keys or left:
        raise RuntimeError(f"transformers twin: unexpected {result.unexpected_keys[:5]}, unset {left[:5]}")
    # NOTE: the rotary inv_freq buffers were made on the meta device: recompute them on the model's.
    device = next(model.parameters()).device
    rotary = ref.model.rotary_emb
    inv_freq, _ = rotary.compute_default_rope_parameters(config, device)
    rotary.inv_freq = inv_freq
    rotary.original_inv_freq = inv_freq.clone()
    return ref.eval().requires_grad_(False)


def main() -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        overrides = {} if device == "cuda" else SMALL_OVERRIDES
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        model = make_model(write_config(tmp, overrides=overrides), dtype=dtype, device=device)
    ref = make_transformers_twin(model)
    params = sum(p.numel() for p in model.parameters())
    print(f"{LABEL} model on {device}: {params / 1e9:.2f} B parameters; experts: {ref.config._experts_implementation}")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_e2e import twin_check

    err = twin_check(model, ref)
    print(f"logits rel err ours vs transformers ({dtype}): {err:.2e}")
    sys.exit(0 if err < 5e-2 else 1)


if __name__ == "__main__":
    main()
