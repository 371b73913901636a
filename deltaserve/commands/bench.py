"""``deltaserve bench``: offline throughput in nano-vllm's protocol, prefill and decode reported apart."""

from __future__ import annotations

import argparse
import random
import sys
import time

from deltaserve.commands import bench_shared_prefix
from deltaserve.commands.generate import add_engine_arguments, engine_kwargs

HELP = "offline benchmark: throughput on random prompts, or the prefix cache on shared prefixes (--workload)"

DESCRIPTION = """\
Protocol (nano-vllm's bench.py): with a fixed --seed, draw --num-requests prompts of random token ids
(ids below min(vocab_size, 10000)) with input lengths uniform in [--min-input, --max-input] and
output lengths uniform in [--min-output, --max-output]; every request ignores EOS, so it produces
exactly its output length. One warm-up generate, then:

  prefill pass  the same prompts with max_tokens=1, timed: prefill tok/s = input tokens / its time
                (every step of this pass is a prefill; it includes sampling the single token).
  timed run     the full workload with continuous batching, timed end to end:
                output tok/s = output tokens / total time.
                decode tok/s = tokens of the decode-only steps of this run / the time of those
                steps (steps that mixed prefill chunks and decodes are left out of both).
The prefix cache is emptied before each pass, so no pass reuses the prompts of the one before.

--workload shared-prefix:
""" + bench_shared_prefix.__doc__.split("\n", 2)[2]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = DESCRIPTION
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    add_engine_arguments(parser)
    parser.add_argument("--num-requests", type=int, default=64, help="requests in the timed run (default 64)")
    parser.add_argument("--min-input", type=int, default=16, help="shortest prompt, tokens (default 16)")
    parser.add_argument("--max-input", type=int, default=256, help="longest prompt, tokens (default 256)")
    parser.add_argument("--min-output", type=int, default=16, help="shortest output, tokens (default 16)")
    parser.add_argument("--max-output", type=int, default=128, help="longest output, tokens (default 128)")
    parser.add_argument(
        "--temperature", type=float, default=0.6, help="sampling temperature (default 0.6, as nano-vllm)"
    )
    parser.add_argument("--seed", type=int, default=0, help="workload and sampling seed (default 0)")
    parser.add_argument("--workload", choices=("random", "shared-prefix"), default="random",
                        help="random prompts (throughput) or shared prefixes (prefix cache on vs off)")
    parser.add_argument("--block-size", type=int, default=16, help="KV block size in tokens (default 16)")
    parser.add_argument("--checkpoint-interval", type=int, default=None,
                        help="prefix cache: tokens between state checkpoints (default: EngineConfig's)")
    bench_shared_prefix.add_arguments(parser)


def check_workload(args: argparse.Namespace) -> None:
    """ValueError naming the flag when the workload sizes are out of range."""
    for low, high, name in ((args.min_input, args.max_input, "input"), (args.min_output, args.max_output, "output")):
        if not 1 <= low <= high:
            raise ValueError(f"--min-{name} and --max-{name} must satisfy 1 <= min <= max, got {low} and {high}")
    if args.num_requests < 1:
        raise ValueError(f"--num-requests must be >= 1, got {args.num_requests}")


def make_workload(args: argparse.Namespace, vocab_size: int) -> tuple[list[list[int]], list[int]]:
    """Prompts (token ids) and output lengths, the same for the same seed and sizes."""
    check_workload(args)
    rng = random.Random(args.seed)
    id_limit = min(vocab_size, 10_000)
    prompts = [
        [rng.randrange(id_limit) for _ in range(rng.randint(args.min_input, args.max_input))]
        for _ in range(args.num_requests)
    ]
    output_lens = [rng.randint(args.min_output, args.max_output) for _ in range(args.num_requests)]
    return prompts, output_lens


def run(args: argparse.Namespace) -> int:
    from deltaserve import LLM, SamplingParams

    extra = {} if args.checkpoint_interval is None else {"checkpoint_interval": args.checkpoint_interval}
    try:
        # NOTE: before the model loads, so that a bad flag is reported at once.
        check_workload(args)
        llm = LLM(**engine_kwargs(args), seed=args.seed, block_size=args.block_size, **extra)
        prompts, output_lens = make_workload(args, llm.llm_engine.hf_config.vocab_size)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.workload == "shared-prefix":
        return bench_shared_prefix.run(args, llm)
    engine = llm.llm_engine

    def params(max_tokens: int, seed: int) -> SamplingParams:
        return SamplingParams(temperature=args.temperature, seed=seed, max_tokens=max_tokens, ignore_eos=True)

    # Warm-up: a few of the prompts, so both prefill and decode paths have run once.
    llm.generate(prompts[:4], [params(4, i) for i in range(min(4, len(prompts)))], use_tqdm=False)

    engine.reset_prefix_cache()
    start = time.perf_counter()
    llm.generate(prompts, params(1, args.seed), use_tqdm=False)
    prefill_time = time.perf_counter() - start

    engine.reset_prefix_cache()
    before = engine.stats()
    start = time.perf_counter()
    outputs = llm.generate(prompts, [params(n, args.seed + i) for i, n in enumerate(output_lens)], use_tqdm=True)
    total_time = time.perf_counter() - start
    after = engine.stats()

    input_tokens = sum(len(p) for p in prompts)
    output_tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    decode_tokens = after["decode_only_tokens"] - before["decode_only_tokens"]
    decode_time = after["decode_only_time_s"] - before["decode_only_time_s"]
    config = engine.config
    rows = [
        ("requests", f"{len(prompts)}"),
        ("input tokens", f"{input_tokens}"),
        ("output tokens", f"{output_tokens}"),
        ("total time (s)", f"{total_time:.2f}"),
        ("output tok/s", f"{output_tokens / total_time:.1f}"),
        ("prefill tok/s", f"{input_tokens / prefill_time:.1f}"),
        ("decode tok/s", f"{decode_tokens / decode_time:.1f}" if decode_time > 0 else "n/a"),
        ("preemptions", f"{after['num_preemptions'] - before['num_preemptions']}"),
    ]
    print(
        f"model={config.model} dtype={config.dtype} device={config.device} max_num_seqs={config.max_num_seqs} "
        f"max_num_batched_tokens={config.max_num_batched_tokens} seed={args.seed}"
    )
    width = max(len(name) for name, _ in rows)
    print(f"{'metric':<{width}}  value")
    print(f"{'-' * width}  {'-' * 10}")
    for name, value in rows:
        print(f"{name:<{width}}  {value:>10}")
    print(
        f"prefill tok/s: input tokens / time of a max_tokens=1 pass ({prefill_time:.2f} s); "
        f"decode tok/s: {decode_tokens} tokens of decode-only steps in {decode_time:.2f} s"
    )
    return 0
