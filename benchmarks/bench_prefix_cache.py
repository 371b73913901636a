"""Prefix caching on a Kimi-Linear-shaped model, one GPU: what checkpoints cost, and what they save.

One engine (bf16 weights, float32 recurrent states), six settings of its prefix cache, the same
prompts and greedy sampling in each, the cache emptied before each run:

- ``off``: no prefix cache (the baseline of the cost case);
- ``chunk-end chunk``: checkpoints end prefill chunks, every ``max_num_batched_tokens`` (before
  in-forward capture: the default then);
- ``chunk-end 256``: the same every 256 tokens (one forward step per checkpoint: the +64% case);
- ``in-forward 256``: checkpoints every 256 tokens saved inside the forward (now the default);
  ``in-forward 512`` and ``1024`` the same, coarser.

Cost case: ``--num-unique`` unique prompts of ``--min-len``..``--max-len`` tokens submitted at
once, and one lone prompt; mean TTFT per setting and its overhead over ``off`` (target: within 5%).
Then the shared-system-prompt and multi-turn workloads of ``deltaserve bench --workload
shared-prefix`` (its parts and its TTFT: add_request to the end of the step of the first token).

    python benchmarks/bench_prefix_cache.py                      # H200 / H100
    python benchmarks/bench_prefix_cache.py --device cpu --config-overrides small --max-len 600 --min-len 300 \\
        --num-unique 2 --system-prompt-len 300                   # a dry run of the script on the CPU
"""

from __future__ import annotations

import argparse
import datetime
import json
import random
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_kimi_shaped  # noqa: E402

from deltaserve import LLM  # noqa: E402
from deltaserve.commands.bench_shared_prefix import Turn, make_parts, run_part  # noqa: E402
from deltaserve.ops.delta_rule import CHUNK_SIZE  # noqa: E402

SETTINGS = {  # name -> (prefix cache on, capture grid, interval; None = max_num_batched_tokens)
    "off": (False, None, None),
    "chunk-end chunk": (True, None, None),
    "chunk-end 256": (True, None, 256),
    "in-forward 256": (True, CHUNK_SIZE, 256),
    # NOTE: coarser intervals: the cost of more checkpoint copies (one pass in every case).
    "in-forward 512": (True, CHUNK_SIZE, 512),
    "in-forward 1024": (True, CHUNK_SIZE, 1024),
}


def configure(llm: LLM, name: str, chunk: int) -> None:
    """Switch the engine's prefix cache to setting ``name`` (idle engine; the cache is emptied)."""
    enabled, grid, interval = SETTINGS[name]
    engine = llm.llm_engine
    engine.set_prefix_caching(enabled)
    # NOTE: the two attributes the engine derives from checkpoints_in_forward / checkpoint_interval at
    # start; switching them on one engine keeps the model, pools and compiled kernels the same.
    engine.prefix_cache.grid = grid
    engine.prefix_cache.interval = interval or chunk


def build_llm(config_dir: Path, model, args) -> LLM:
    from deltaserve.models import loader

    original = loader.load_model
    loader.load_model = lambda *a, **k: model
    try:
        return LLM(model=str(config_dir), dtype="bfloat16", device=args.device, max_model_len=args.max_len + 2048,
                   max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                   checkpoint_interval=256)  # fmt: skip
    finally:
        loader.load_model = original


def ttft_ms(result) -> float:
    return 1e3 * statistics.fmean(result.ttft)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--num-unique", type=int, default=16)
    p.add_argument("--min-len", type=int, default=2000)
    p.add_argument("--max-len", type=int, default=8000)
    p.add_argument("--lone-len", type=int, default=4669)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--num-experts", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS),
                   help="which settings to run ('off' always runs first: the baseline)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--config-overrides", default=None, help="JSON, or 'small' (a CPU dry run)")
    # The shared-prefix workloads (deltaserve bench --workload shared-prefix's flags).
    p.add_argument("--num-requests", type=int, default=16)
    p.add_argument("--system-prompt-len", type=int, default=2000)
    p.add_argument("--min-input", type=int, default=50)
    p.add_argument("--max-input", type=int, default=400)
    p.add_argument("--min-output", type=int, default=16)
    p.add_argument("--max-output", type=int, default=64)
    p.add_argument("--num-conversations", type=int, default=8)
    p.add_argument("--num-turns", type=int, default=4)
    args = p.parse_args()
    args.temperature = 0.0
    overrides = None
    if args.config_overrides is not None:
        overrides = make_kimi_shaped.SMALL_OVERRIDES if args.config_overrides == "small" else json.loads(
            args.config_overrides)
    card = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu (dry run)"
    print(f"# bench_prefix_cache: {card}; torch {torch.__version__}; "
          f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC\n# command: {' '.join(sys.argv)}")
    config_dir = make_kimi_shaped.write_config(Path(tempfile.mkdtemp()) / "kimi", args.num_experts, overrides)
    model = make_kimi_shaped.make_model(config_dir, torch.bfloat16, args.device, seed=args.seed)
    llm = build_llm(config_dir, model, args)
    engine, chunk = llm.llm_engine, args.max_num_batched_tokens
    print(engine.prefix_cache.describe())
    vocab = min(engine.hf_config.vocab_size, 10_000)
    rng = random.Random(args.seed)
    unique = [Turn(-1, 0, [rng.randrange(vocab) for _ in range(rng.randint(args.min_len, args.max_len))], 1, i)
              for i in range(args.num_unique)]
    lone = [Turn(-1, 0, [rng.randrange(vocab) for _ in range(args.lone_len)], 1, 0)]
    requests, chats, user_texts = make_parts(args, vocab)

    settings = ["off"] + [name for name in args.settings if name != "off"]
    # Warm-up: every setting once on a few prompts (kernels compile and autotune for these shapes).
    for name in settings:
        configure(llm, name, chunk)
        run_part(engine, unique[:2] + lone, args)
    rows = {}
    for name in settings:
        configure(llm, name, chunk)
        cost, alone = run_part(engine, unique, args), run_part(engine, lone, args)
        configure(llm, name, chunk)
        system = run_part(engine, requests, args, first_alone=True)
        configure(llm, name, chunk)
        chat = run_part(engine, chats, args, user_texts)
        rows[name] = (cost, alone, system, chat)
        print(f"{name}: unique TTFT {ttft_ms(cost):.1f} ms (vs off {ttft_ms(cost) / ttft_ms(rows['off'][0]) - 1:+.1%}), "
              f"lone {ttft_ms(alone):.1f} ms (vs off {ttft_ms(alone) / ttft_ms(rows['off'][1]) - 1:+.1%}), "
              f"system hit {system.hit_tokens / system.prompt_tokens:.1%} TTFT {ttft_ms(system):.1f} ms, "
              f"chat hit {chat.hit_tokens / chat.prompt_tokens:.1%} TTFT {ttft_ms(chat):.1f} ms "
              f"({engine.get_metrics().get('checkpoints_captured', 0)} checkpoints captured so far)", flush=True)

    base_cost, base_alone = ttft_ms(rows["off"][0]), ttft_ms(rows["off"][1])
    print(f"\n## {card}: prefix caching on {make_kimi_shaped.LABEL} ({args.num_experts} experts, bf16 weights, "
          f"float32 states), chunk {chunk} tokens")
    print(f"| setting | {args.num_unique} unique {args.min_len}-{args.max_len}-token prompts: TTFT mean ms (vs off) | "
          f"lone {args.lone_len}-token prompt: TTFT ms (vs off) | system prompt ({args.system_prompt_len} tok, "
          f"{args.num_requests} req, first alone): hit rate, TTFT mean ms | chat ({args.num_conversations}x"
          f"{args.num_turns} turns): hit rate, TTFT mean ms |")
    print("|---|---|---|---|---|")
    for name, (cost, alone, system, chat) in rows.items():
        def hit(r):
            return f"{r.hit_tokens / r.prompt_tokens:.1%}"

        print(f"| {name} | {ttft_ms(cost):.1f} ({ttft_ms(cost) / base_cost - 1:+.1%}) | "
              f"{ttft_ms(alone):.1f} ({ttft_ms(alone) / base_alone - 1:+.1%}) | {hit(system)}, {ttft_ms(system):.1f} | "
              f"{hit(chat)}, {ttft_ms(chat):.1f} |")
    print("TTFT: add_request to the end of the step that gave the first token (all unique prompts submitted at "
          "once); hit rate: prompt tokens restored from the cache / prompt tokens")


if __name__ == "__main__":
    main()
