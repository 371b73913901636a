"""Decode tok/s with and without speculative decoding: random Kimi-shaped and Qwen3-Next-shaped models.

Drafts come from the synthetic proposer (``method="synthetic"``): random weights accept nothing, so
the acceptance is forced to a mean length (1.0, 2.0, 3.4 tokens per verify step with k = 3) while the
whole verification path runs for real: the 1 + k token forward, the rejection sampler, the replay
commit of the linear layers. The baseline is the same engine without a speculator, measured in the
same run. Both run CUDA graphs: decode steps, and verify steps with their commits (captured at start
for k = 3; a step with a prefill chunk runs eager). At acceptance 1.0 the default
config turns drafting off by itself (``auto_disable``); the "1.0 forced" row keeps verifying anyway.

    bash scripts/gpu_run.sh python benchmarks/bench_spec_decode.py                # both models, H200
    python benchmarks/bench_spec_decode.py --small --device cpu --batch 1 2 --output-len 8   # dry run

Decode tok/s = tokens generated after the first (prefill) token / time of the decode-only steps.

"bytes bound": the most speculation can gain when both steps run at the memory floor, acceptance x
(bytes of a decode step) / (bytes of a verify step): a verify step of ``1 + k`` tokens a row reads the
experts hit by all of them, which for random weights (routing close to uniform) is many more than a
decode step's ``top_k`` at small batch.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO))

import make_kimi_shaped  # noqa: E402
import make_qwen3_next_shaped  # noqa: E402

from deltaserve import LLM, SamplingParams  # noqa: E402
from deltaserve.spec_decode.config import SpeculativeConfig  # noqa: E402
from deltaserve.spec_decode.speculator import Speculator  # noqa: E402

K = 3
# The real dimensions with 32 routed experts (make_*_shaped.py), or their small CPU dry-run overrides.
MAKERS = {"kimi": make_kimi_shaped, "qwen3_next": make_qwen3_next_shaped}


def build_llm(name: str, tmp: Path, args) -> LLM:
    """``LLM`` over a random model of that shape (built on the device, no checkpoint on disk)."""
    from deltaserve.models import loader

    maker = MAKERS[name]
    config_dir = maker.write_config(tmp / name, overrides=maker.SMALL_OVERRIDES if args.small else None)
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    model = maker.make_model(config_dir, dtype=dtype, device=args.device)
    original, loader.load_model = loader.load_model, lambda *a, **k: model
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
    steps = after["decode_only_steps"] - before["decode_only_steps"]
    return tokens / max(seconds, 1e-9), 1e3 * seconds / max(steps, 1)


def weight_bytes(model: torch.nn.Module, tokens: int) -> float:
    """Weights one forward of ``tokens`` tokens reads: all dense ones, and of each MoE layer's routed
    experts the expected number hit when each token picks ``top_k`` of ``E`` uniformly."""
    from deltaserve.layers.moe import FusedExperts

    experts, hit = 0.0, 0.0
    top_k = getattr(model.config, "num_experts_per_tok", None)
    for module in model.modules():
        if isinstance(module, FusedExperts):
            size = sum(t.numel() * t.element_size() for t in module.parameters())
            num = module.w13_weight.shape[0]
            k = top_k or num
            experts += size
            hit += size * (1.0 - (1.0 - k / num) ** tokens)
    return sum(t.numel() * t.element_size() for t in model.parameters()) - experts + hit


def bytes_bound(llm: LLM, batch: int, acceptance: float | None) -> float:
    """acceptance x floor bytes of a decode step / floor bytes of a verify step (weights and states)."""
    if acceptance is None:
        return 1.0
    runner = llm.llm_engine.runner
    pool = runner.state_pool
    states = 2 * pool.bytes_total / (pool.num_slots + 1) * batch
    decode = weight_bytes(runner.model, batch) + states
    verify = weight_bytes(runner.model, batch * (1 + K)) + states
    return acceptance * decode / verify


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
            llm = build_llm(name, Path(tmp), args)
            settings = [(None, True, "off")] + [(a, True, f"{a:.1f}") for a in args.acceptance]
            if 1.0 in args.acceptance:
                settings.append((1.0, False, "1.0 forced"))
            for batch in args.batch:
                base = None
                for acceptance, auto_disable, label in settings:
                    set_speculation(llm, acceptance, auto_disable)
                    decode_rate(llm, batch, args, output_len=min(16, args.output_len))  # warm-up of the shapes
                    start = time.perf_counter()
                    rate, step_ms = decode_rate(llm, batch, args, args.output_len)
                    wall = time.perf_counter() - start
                    base = rate if acceptance is None else base
                    spec = llm.llm_engine.runner.speculator
                    measured = spec.metrics.mean_acceptance_length if spec is not None else 1.0
                    disabled = spec.metrics.num_disabled_steps if spec is not None else 0
                    bound = bytes_bound(llm, batch, acceptance)
                    bound = max(bound, 1.0) if auto_disable else bound  # drafting may turn itself off
                    rows.append((name, batch, label, rate, rate / base, bound, measured, step_ms))
                    print(f"{name:>10} | batch {batch:>3} | spec {label:>10} | {rate:9.1f} tok/s | "
                          f"x{rate / base:5.2f} (bytes bound x{bound:4.2f}) | acceptance {measured:4.2f} | {step_ms:7.2f} ms/step | "
                          f"steps w/o drafts {disabled:4d} | {wall:6.1f} s", flush=True)  # fmt: skip
            del llm
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    print("\n| model | batch | speculation (mean acceptance length) | decode tok/s | vs no speculation | "
          "bytes bound | measured acceptance | ms per decode step |")
    print("|---|---|---|---|---|---|---|---|")
    for name, batch, label, rate, speedup, bound, measured, step_ms in rows:
        print(f"| {name} | {batch} | {label} | {rate:.1f} | {speedup:.2f}x | {bound:.2f}x | {measured:.2f} | {step_ms:.2f} |")


if __name__ == "__main__":
    main()
