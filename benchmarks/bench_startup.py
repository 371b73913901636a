"""Start-up cost and compile stalls: does any request pay for a Triton compile or autotune after start?

Runs the engine twice in fresh processes that share one Triton cache directory (empty at first):

1. **cold**: build the Kimi-shaped model, start the engine (its warm-up included), then serve a
   workload whose prompt lengths the warm-up never saw (a burst of random lengths, then lone prompts
   of odd lengths, arriving while others decode). Every step is timed with its batch shape, and every
   Triton compilation after start is logged (kernel, seconds) through Triton's JIT hooks.
2. **warm restart**: the same, with the Triton cache (compiled kernels and autotuning results) on disk.

It prints the start-up seconds of both, the compilations after start, and per step-size bucket the
median and the slowest step (the target: no step over 2x the median of its bucket).

    python benchmarks/bench_startup.py                     # both phases, Kimi-shaped model on cuda
    python benchmarks/bench_startup.py --num-layers 4      # same kernels, a quicker model
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


class CompileLog:
    """Triton compilations (kernel name, seconds) seen through ``triton.knobs.runtime`` JIT hooks."""

    def __init__(self):
        self.events: list[tuple[str, float]] = []
        self._pending: dict[str, float] = {}
        try:
            from triton import knobs
        except ImportError:  # older Triton: step times only
            return
        knobs.runtime.jit_cache_hook = self._before
        knobs.runtime.jit_post_compile_hook = self._after

    def _before(self, *, key, **kwargs):
        self._pending[str(key)] = time.perf_counter()
        return False  # compile as usual

    def _after(self, *, key, fn, **kwargs):
        start = self._pending.pop(str(key), None)
        if start is not None:
            self.events.append((getattr(fn, "name", str(fn)), time.perf_counter() - start))

    def since(self, index: int) -> list[tuple[str, float]]:
        return self.events[index:]


def workload(vocab: int, seed: int, max_len: int) -> list[tuple[int, list[int], int]]:
    """``(arrival step, prompt, output tokens)``: a burst of 48 random lengths at step 0, then 12 lone
    prompts of odd lengths (never multiples of 16 or 64), one every 25 steps, joining running decodes."""
    rng = random.Random(seed)
    burst = [(0, rng.randint(37, max_len - 200), rng.randint(32, 160)) for _ in range(48)]
    lone = [(25 * (i + 1), rng.randrange(60, (max_len - 200) // 16) * 16 + rng.choice([1, 3, 7, 13]), 16)
            for i in range(12)]
    return [(t, [rng.randrange(vocab) for _ in range(n)], out) for t, n, out in burst + lone]


def child(args) -> None:
    """One engine process: start-up, then the workload; prints one JSON line."""
    import torch

    sys.path.insert(0, str(HERE))
    import make_kimi_shaped
    from bench_e2e import build_llm

    from deltaserve import SamplingParams

    log = CompileLog()
    overrides = None
    if args.num_layers:
        n = args.num_layers
        overrides = {"num_hidden_layers": n, "linear_attn_config": {
            "head_dim": 128, "num_heads": 32, "short_conv_kernel_size": 4,
            "kda_layers": [i for i in range(1, n + 1) if i % 4], "full_attn_layers": [i for i in range(1, n + 1) if i % 4 == 0]}}
    config_dir = make_kimi_shaped.write_config(Path(tempfile.mkdtemp()) / "kimi-shaped", args.num_experts, overrides)
    model = make_kimi_shaped.make_model(config_dir, torch.bfloat16, "cuda", seed=0)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    llm = build_llm(config_dir, model, argparse.Namespace(
        device="cuda", max_len=args.max_len, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, enforce_eager=False, async_scheduling="auto"))
    torch.cuda.synchronize()
    startup = time.perf_counter() - t0
    compiles_at_start = len(log.events)
    engine = llm.llm_engine
    requests = workload(model.config.vocab_size, args.seed, args.max_len)
    pending = sorted(enumerate(requests), key=lambda r: r[1][0])
    steps: list[tuple[float, int, int]] = []
    scheduled = {}
    schedule = engine.scheduler.schedule

    def recording_schedule():
        scheduled["batch"] = schedule()
        return scheduled["batch"]

    engine.scheduler.schedule = recording_schedule
    step = 0
    while pending or engine.has_unfinished_requests():
        while pending and pending[0][1][0] <= step:
            i, (_, prompt, out) = pending.pop(0)
            engine.add_request(f"r{i}", prompt, SamplingParams(temperature=0.0, max_tokens=out, ignore_eos=True))
        if not engine.has_unfinished_requests():
            step = pending[0][1][0]
            continue
        torch.cuda.synchronize()
        s0 = time.perf_counter()
        engine.step()
        torch.cuda.synchronize()
        b = scheduled["batch"]
        steps.append((time.perf_counter() - s0, b.num_prefill_tokens, b.num_decode_tokens))
        step += 1
    after = log.since(compiles_at_start)
    print("RESULT " + json.dumps({
        "startup_s": startup, "compiles_at_start": compiles_at_start,
        "compile_s_at_start": sum(t for _, t in log.events[:compiles_at_start]),
        "compiles_after_start": after, "steps": steps,
    }))


def bucket(step: tuple[float, int, int]) -> str:
    _, prefill, decode = step
    if prefill == decode == 0:  # the last step in flight resolved, nothing left to launch
        return "no forward (empty batch)"
    if prefill == 0:
        return f"decode-only, batch {1 << max(0, (decode - 1).bit_length())} (pow2 bucket)"
    return f"with prefill, {1 << max(0, (prefill - 1).bit_length())} tokens (pow2 bucket)"


def report(label: str, result: dict) -> None:
    print(f"\n## {label}: engine start-up {result['startup_s']:.1f} s "
          f"({result['compiles_at_start']} Triton compilations, {result['compile_s_at_start']:.1f} s of them)")
    after = result["compiles_after_start"]
    print(f"compilations after start: {len(after)}, {sum(t for _, t in after):.2f} s"
          + "".join(f"\n  {name}: {t:.2f} s" for name, t in after[:30]))
    groups: dict[str, list[float]] = {}
    for s in result["steps"]:
        groups.setdefault(bucket(s), []).append(s[0])
    print("| step bucket | steps | median ms | slowest ms | slowest / median |\n|---|---:|---:|---:|---:|")
    worst = 0.0
    for name in sorted(groups):
        times = groups[name]
        med, top = statistics.median(times), max(times)
        worst = max(worst, top / med)
        print(f"| {name} | {len(times)} | {med * 1e3:.1f} | {top * 1e3:.1f} | {top / med:.2f} |")
    print(f"worst slowest/median: {worst:.2f} (target <= 2)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--num-layers", type=int, default=0, help="0: the 27 layers of the 48B config")
    p.add_argument("--num-experts", type=int, default=32)
    p.add_argument("--max-len", type=int, default=8192)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=16384)
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args()
    if args.child:
        child(args)
        return
    import torch

    props = torch.cuda.get_device_properties(0)
    print(f"# bench_startup: {props.name}; torch {torch.__version__}; command: {' '.join(sys.argv)}")
    cache = tempfile.mkdtemp(prefix="triton-cache-")
    env = dict(os.environ, TRITON_CACHE_DIR=cache, PYTHONUNBUFFERED="1")
    command = [sys.executable, __file__, "--child"] + sys.argv[1:]
    for label in ("cold start (empty Triton cache)", "warm restart (Triton cache on disk)"):
        out = subprocess.run(command, env=env, capture_output=True, text=True)
        lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
        if out.returncode != 0 or not lines:
            print(out.stdout[-4000:], out.stderr[-4000:])
            raise SystemExit(f"{label}: child failed with status {out.returncode}")
        report(label, json.loads(lines[-1][len("RESULT "):]))


if __name__ == "__main__":
    main()
