"""``deltaserve bench --workload shared-prefix``: prefix-cache hit rate, prefill saved, TTFT with and without.

Two parts, each run twice on the same engine (prefix cache off, then on, the cache emptied before
each run), with the same prompts and per-request seeds:

- system prompt: ``--num-requests`` requests = one random system prompt of ``--system-prompt-len``
  tokens + a distinct random suffix (``--min-input``..``--max-input`` tokens); the first is sent
  alone (a system prompt is first seen in one request), the others at once when it has finished.
- chat: ``--num-conversations`` conversations of ``--num-turns`` turns, run side by side; turn 1 is
  the system prompt + a user text, turn ``t`` = turn ``t-1``'s prompt + its output + a new user text;
  a conversation submits its next turn as soon as the previous one finishes.

TTFT of a request: from its ``add_request`` to the end of the step that gave its first token.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from dataclasses import dataclass

from deltaserve.engine.sampling_params import SamplingParams


@dataclass
class Turn:
    conversation: int
    index: int
    prompt: list[int]
    max_tokens: int
    seed: int


@dataclass
class PartResult:
    requests: int
    prompt_tokens: int
    computed: int
    hit_tokens: int
    ttft: list[float]
    seconds: float


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--system-prompt-len", type=int, default=384,
                        help="shared-prefix workload: tokens of the common system prompt (default 384)")
    parser.add_argument("--num-conversations", type=int, default=8,
                        help="shared-prefix workload: chats run side by side (default 8)")
    parser.add_argument("--num-turns", type=int, default=4, help="shared-prefix workload: turns per chat (default 4)")


def make_parts(args: argparse.Namespace, vocab_size: int) -> tuple[list[Turn], list[Turn], list[tuple]]:
    """System-prompt requests, first chat turns, and ``(user text, max_tokens)`` per chat and turn."""
    for name in ("system_prompt_len", "num_conversations", "num_turns", "num_requests"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    rng = random.Random(args.seed)
    id_limit = min(vocab_size, 10_000)

    def text(low: int, high: int) -> list[int]:
        return [rng.randrange(id_limit) for _ in range(rng.randint(low, high))]

    system = text(args.system_prompt_len, args.system_prompt_len)
    outputs = lambda: rng.randint(args.min_output, args.max_output)  # noqa: E731
    requests = [Turn(-1, 0, system + text(args.min_input, args.max_input), outputs(), args.seed + i)
                for i in range(args.num_requests)]
    chats = [Turn(c, 0, system + text(args.min_input, args.max_input), outputs(), args.seed + 10_000 * (c + 1))
             for c in range(args.num_conversations)]
    user_texts = [(text(args.min_input, args.max_input), outputs())
                  for _ in range(args.num_conversations * args.num_turns)]
    return requests, chats, user_texts


def run_part(engine, turns: list[Turn], args, user_texts: list[tuple] | None = None,
             first_alone: bool = False) -> PartResult:
    """Run ``turns`` (and, with ``user_texts``, the chats' later turns) to completion; counters and TTFTs.

    ``first_alone``: the first turn runs to its end before the others are submitted.
    """
    before = engine.stats()
    pending = {f"{t.conversation}.{t.index}.{i}": t for i, t in enumerate(turns)}
    held = list(pending.items())[1:] if first_alone else []
    arrival, ttft, num_requests = {}, [], 0

    def submit(request_id: str, turn: Turn) -> None:
        nonlocal num_requests
        params = SamplingParams(temperature=args.temperature, seed=turn.seed, max_tokens=turn.max_tokens,
                                ignore_eos=True)
        engine.add_request(request_id, turn.prompt, params)
        arrival[request_id] = time.perf_counter()
        num_requests += 1

    start = time.perf_counter()
    for request_id, turn in list(pending.items())[: 1 if first_alone else None]:
        submit(request_id, turn)
    while engine.has_unfinished_requests() or held:
        if not engine.has_unfinished_requests():
            for request_id, turn in held:
                submit(request_id, turn)
            held = []
        outputs = engine.step()
        now = time.perf_counter()
        for out in outputs:
            if out.request_id in arrival and out.outputs[0].token_ids:
                ttft.append(now - arrival.pop(out.request_id))
            turn = pending[out.request_id]
            if out.finished and user_texts is not None and turn.index + 1 < args.num_turns:
                new_text, max_tokens = user_texts[turn.conversation * args.num_turns + turn.index + 1]
                prompt = turn.prompt + list(out.outputs[0].token_ids) + new_text
                nxt = Turn(turn.conversation, turn.index + 1, prompt, max_tokens, turn.seed + turn.index + 1)
                request_id = f"{nxt.conversation}.{nxt.index}"
                pending[request_id] = nxt
                submit(request_id, nxt)
    seconds = time.perf_counter() - start
    after = engine.stats()
    delta = {k: after[k] - before[k] for k in ("prompt_tokens", "prompt_tokens_computed", "prefix_cache_hit_tokens")}
    return PartResult(num_requests, delta["prompt_tokens"], delta["prompt_tokens_computed"],
                      delta["prefix_cache_hit_tokens"], ttft, seconds)


def run(args: argparse.Namespace, llm) -> int:
    engine = llm.llm_engine
    if engine.prefix_cache is None:
        print("error: --workload shared-prefix compares the prefix cache on and off; do not turn it off",
              file=sys.stderr)
        return 2
    try:
        requests, chats, user_texts = make_parts(args, engine.hf_config.vocab_size)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    # Warm-up, both paths: a few requests without and with the cache.
    for enabled in (False, True):
        engine.set_prefix_caching(enabled)
        run_part(engine, requests[:2], args)
    results = {}
    for part, turns, texts in (("system prompt", requests, None), ("chat", chats, user_texts)):
        for enabled in (False, True):
            engine.set_prefix_caching(enabled)  # NOTE: also empties the cache: each run starts cold
            results[part, enabled] = run_part(engine, turns, args, texts, first_alone=texts is None)
    config = engine.config
    print(
        f"workload=shared-prefix model={config.model} dtype={config.dtype} device={config.device} "
        f"system_prompt_len={args.system_prompt_len} requests={args.num_requests} "
        f"conversations={args.num_conversations}x{args.num_turns} turns block_size={config.block_size} "
        f"checkpoint_interval={config.checkpoint_interval} max_num_seqs={config.max_num_seqs} "
        f"max_num_batched_tokens={config.max_num_batched_tokens} seed={args.seed}"
    )
    header = ("part", "cache", "requests", "prompt tok", "computed", "hit rate", "saved tok", "TTFT mean ms",
              "TTFT p50 ms", "TTFT p90 ms", "total s")
    rows = []
    for (part, enabled), r in results.items():
        off = results[part, False]
        ttft = sorted(r.ttft)
        rows.append((
            part, "on" if enabled else "off", str(r.requests), str(r.prompt_tokens), str(r.computed),
            f"{r.hit_tokens / r.prompt_tokens:.1%}" if r.prompt_tokens else "n/a", str(off.computed - r.computed),
            f"{1e3 * statistics.fmean(ttft):.1f}", f"{1e3 * ttft[len(ttft) // 2]:.1f}",
            f"{1e3 * ttft[min(len(ttft) - 1, int(0.9 * len(ttft)))]:.1f}", f"{r.seconds:.2f}",
        ))
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print("  ".join(v.ljust(w) if i < 2 else v.rjust(w) for i, (v, w) in enumerate(zip(row, widths))))
    print("hit rate: prompt tokens restored from the cache / prompt tokens; saved tok: prompt tokens computed "
          "without the cache minus with it; TTFT: add_request to the end of the step of the first token")
    return 0
