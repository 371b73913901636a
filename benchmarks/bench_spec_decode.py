"""Decode tok/s with and without speculative decoding: random Kimi-shaped and Qwen3-Next-shaped models.

Drafts come from the synthetic proposer (``method="synthetic"``): random weights accept nothing, so
the acceptance is forced to a mean length (1.0, 2.0, 3.4 tokens per verify step with k = 3) while the
whole verification path runs for real: the 1 + k token forward, the rejection sampler, the replay
commit of the linear layers. The baseline is the same engine without a speculator, measured in the
same run (CUDA graphs for its decode steps; verify steps run eager). At acceptance 1.0 the default
config turns drafting off by itself (``auto_disable``); the "1.0 forced" row keeps verifying anyway.

    bash scripts/gpu_run.sh python benchmarks/bench_spec_decode.py                # both models, H200
    python benchmarks/bench_spec_decode.py --small --device cpu --batch 1 2 --output-len 8   # dry run

Decode tok/s = tokens generated after the first (prefill) token / time of the decode-only steps.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO))

from make_kimi_shaped import SMALL_OVERRIDES, init_random_, write_config  # noqa: E402

from deltaserve import LLM, SamplingParams  # noqa: E402
from deltaserve.spec_decode.config import SpeculativeConfig  # noqa: E402
from deltaserve.spec_decode.speculator import Speculator  # noqa: E402

K = 3
# Qwen3-Next-80B-A3B's dimensions, 64 routed experts instead of 512 (to fit one card with room to spare).
QWEN3_NEXT_CONFIG = {
    "architectures": ["Qwen3NextForCausalLM"], "model_type": "qwen3_next", "vocab_size": 151936,
    "hidden_size": 2048, "intermediate_size": 5120, "num_hidden_layers": 48, "full_attention_interval": 4,
    "num_attention_heads": 16, "num_key_value_heads": 2, "head_dim": 256, "partial_rotary_factor": 0.25,
    "rope_theta": 10000000, "max_position_embeddings": 262144, "rms_norm_eps": 1e-6, "hidden_act": "silu",
    "linear_num_key_heads": 16, "linear_num_value_heads": 32, "linear_key_head_dim": 128,
    "linear_value_head_dim": 128, "linear_conv_kernel_dim": 4, "num_experts": 64, "num_experts_per_tok": 10,
    "moe_intermediate_size": 512, "shared_expert_intermediate_size": 512, "norm_topk_prob": True,
    "decoder_sparse_step": 1, "mlp_only_layers": [], "tie_word_embeddings": False, "dtype": "bfloat16",
    "bos_token_id": 151643, "eos_token_id": 151645, "num_nextn_predict_layers": 1,
}  # fmt: skip
QWEN3_NEXT_SMALL = {
    "vocab_size": 1024, "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 4, "num_attention_heads": 4,
    "head_dim": 64, "linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_key_head_dim": 32,
    "linear_value_head_dim": 32, "num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 64,
    "shared_expert_intermediate_size": 64, "bos_token_id": 1000, "eos_token_id": 1001,
}  # fmt: skip


def model_dir(name: str, tmp: Path, small: bool) -> Path:
    if name == "kimi":
        return write_config(tmp / name, overrides=SMALL_OVERRIDES if small else None)
    raw = dict(QWEN3_NEXT_CONFIG, **(QWEN3_NEXT_SMALL if small else {}))
    (tmp / name).mkdir(parents=True, exist_ok=True)
    (tmp / name / "config.json").write_text(json.dumps(raw, indent=2))
    return tmp / name


def build_llm(config_dir: Path, args) -> LLM:
    """``LLM`` over a random model of ``config_dir`` (built on the device, no checkpoint on disk)."""
    from deltaserve.models import loader
    from deltaserve.models.registry import resolve

    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32

    def random_model(path, *a, **k):
        hf_config = loader.load_model_config(path)
        with torch.device("meta"):
            model = resolve(hf_config)(hf_config, dtype)
        model = model.to_empty(device=args.device)
        init_random_(model)
        return model.eval().requires_grad_(False)

    original, loader.load_model = loader.load_model, random_model
    try:
        return LLM(
            model=str(config_dir), dtype=str(dtype).removeprefix("torch."), device=args.device,
            max_model_len=args.prompt_len + args.output_len + 2 * K + 8, max_num_seqs=max(args.batch),
            max_num_batched_tokens=max(max(args.batch) * args.prompt_len, 2048), enable_prefix_caching=False,
            # NOTE: any config builds the speculator's buffers; each row below installs its own.
            speculative_config={"method": "synthetic", "num_speculative_tokens": K, "synthetic_acceptance_length": 1.0},
        )  # fmt: skip
    finally:
        loader.load_model = original


def set_speculation(llm: LLM, acceptance: float | None, auto_disable: bool) -> None:
    runner = llm.llm_engine.runner
    if acceptance is None:
        runner.speculator = None
        return
    config = SpeculativeConfig(method="synthetic", num_speculative_tokens=K, synthetic_acceptance_length=acceptance,
                               auto_disable=auto_disable)  # fmt: skip
    runner.speculator = Speculator(config, runner.sampler, max_num_seqs=runner.config.max_num_seqs,
                                   max_model_len=runner.config.max_model_len, runner=runner)  # fmt: skip


def decode_rate(llm: LLM, batch: int, args, output_len: int) -> tuple[float, dict]:
    """Decode tok/s of ``batch`` random prompts generating ``output_len`` tokens each."""
    engine = llm.llm_engine
    rng = random.Random(batch)
    vocab = engine.hf_config.vocab_size
    prompts = [[rng.randrange(vocab) for _ in range(args.prompt_len)] for _ in range(batch)]
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    before = engine.stats()
    llm.generate(prompts, params, use_tqdm=False)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    after = engine.stats()
    tokens = after["generation_tokens"] - before["generation_tokens"] - batch  # minus each first token
    seconds = after["decode_only_time_s"] - before["decode_only_time_s"]
    return tokens / max(seconds, 1e-9), after


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["kimi", "qwen3_next"], choices=["kimi", "qwen3_next"])
    p.add_argument("--batch", nargs="+", type=int, default=[1, 16, 64])
    p.add_argument("--acceptance", nargs="+", type=float, default=[1.0, 2.0, 3.4])
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--device", default="cuda")
    p.add_argument("--small", action="store_true", help="tiny dimensions (a CPU dry run)")
    args = p.parse_args()
    rows = []
    if args.device.startswith("cuda"):
        props = torch.cuda.get_device_properties(0)
        print(f"# {props.name}, torch {torch.__version__}; k = {K}, prompt {args.prompt_len}, output {args.output_len}")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            try:
                llm = build_llm(model_dir(name, Path(tmp), args.small), args)
            except ValueError as exc:  # e.g. an architecture this checkout does not have yet
                print(f"{name}: skipped ({exc})")
                continue
            settings = [(None, True, "off")] + [(a, True, f"{a:.1f}") for a in args.acceptance]
            if 1.0 in args.acceptance:
                settings.append((1.0, False, "1.0 forced"))
            for batch in args.batch:
                base = None
                for acceptance, auto_disable, label in settings:
                    set_speculation(llm, acceptance, auto_disable)
                    decode_rate(llm, batch, args, output_len=min(16, args.output_len))  # warm-up of the shapes
                    start = time.perf_counter()
                    rate, stats = decode_rate(llm, batch, args, args.output_len)
                    wall = time.perf_counter() - start
                    base = rate if acceptance is None else base
                    spec = llm.llm_engine.runner.speculator
                    measured = spec.metrics.mean_acceptance_length if spec is not None else 1.0
                    disabled = spec.metrics.num_disabled_steps if spec is not None else 0
                    rows.append((name, batch, label, rate, rate / base, measured, disabled, wall))
                    print(f"{name:>10} | batch {batch:>3} | spec {label:>10} | {rate:9.1f} tok/s | "
                          f"x{rate / base:5.2f} | acceptance {measured:4.2f} | steps w/o drafts {disabled:4d} | "
                          f"{wall:6.1f} s", flush=True)  # fmt: skip
            del llm
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    print("\n| model | batch | speculation (mean acceptance length) | decode tok/s | vs no speculation | measured acceptance |")
    print("|---|---|---|---|---|---|")
    for name, batch, label, rate, speedup, measured, _, _ in rows:
        print(f"| {name} | {batch} | {label} | {rate:.1f} | {speedup:.2f}x | {measured:.2f} |")


if __name__ == "__main__":
    main()
