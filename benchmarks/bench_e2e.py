"""End-to-end throughput: our engine vs transformers' generate on a Kimi-Linear- or Qwen3-Next-shaped model, one GPU.

Protocol (nano-vllm's bench.py): fixed seed, ``--num-requests`` requests of random token ids with
input and output lengths drawn uniformly from ``[--min-len, --max-len]``, ``ignore_eos``, greedy;
one warm-up, one timed run; output tokens per second. The model is ``make_kimi_shaped``'s (the
48B config's dimensions with 32 experts, random bf16 weights made on the device) or, with
``--model qwen3_next``, ``make_qwen3_next_shaped``'s (the 80B's dimensions with 32 experts).

transformers 5.x ``KimiLinearForCausalLM`` / ``Qwen3NextForCausalLM.generate`` (fla kernels for the
linear layers, grouped_mm experts, its own cache) runs on the same weights (shared tensors).
It is slow, so it times a subset: the first
``--hf-requests`` prompts of the same draw, left-padded into one batch, ``--hf-new-tokens`` new
tokens for every row (no row idles: this favours transformers). Its warm-up is the same batch with
2 new tokens (same prefill shapes, so fla's autotuning is not timed).

    python benchmarks/bench_e2e.py                 # the headline table
    python benchmarks/bench_e2e.py --model qwen3_next
    python benchmarks/bench_e2e.py --skip-hf       # ours only
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_kimi_shaped  # noqa: E402
import make_qwen3_next_shaped  # noqa: E402

from deltaserve import LLM, SamplingParams  # noqa: E402
from deltaserve.layers.moe import FusedExperts  # noqa: E402


def draw_requests(n: int, low: int, high: int, vocab: int, seed: int) -> tuple[list[list[int]], list[int]]:
    rng = random.Random(seed)
    prompts, outputs = [], []
    for _ in range(n):
        prompts.append([rng.randrange(vocab) for _ in range(rng.randint(low, high))])
        outputs.append(rng.randint(low, high))
    return prompts, outputs


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def build_llm(config_dir: Path, model, args) -> LLM:
    """``LLM(model=config_dir)`` with the loader handing back ``model`` (no checkpoint on disk)."""
    from deltaserve.models import loader

    original = loader.load_model
    loader.load_model = lambda *a, **k: model
    try:
        return LLM(
            model=str(config_dir), dtype="bfloat16", device=args.device, max_model_len=2 * args.max_len + 16,
            max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
            enable_prefix_caching=False, extra={"enforce_eager": args.enforce_eager},
            async_scheduling={"auto": None, "on": True, "off": False}[args.async_scheduling],
        )  # fmt: skip
    finally:
        loader.load_model = original


class StepTimer:
    """Wall time of every ``engine.step()`` (scheduling, forward, sampling, outputs) with its batch shape."""

    def __init__(self, engine):
        self.engine = engine
        self.steps: list[tuple[float, int, int]] = []  # (seconds, prefill tokens, decode tokens)
        self._step, self._schedule = engine.step, engine.scheduler.schedule
        self._last = None

        def schedule():
            self._last = self._schedule()
            return self._last

        def step():
            t0 = time.perf_counter()
            out = self._step()
            batch = self._last
            self.steps.append((time.perf_counter() - t0, batch.num_prefill_tokens, batch.num_decode_tokens))
            return out

        engine.scheduler.schedule, engine.step = schedule, step

    def close(self) -> None:
        self.engine.step, self.engine.scheduler.schedule = self._step, self._schedule

    def summary(self, total: float) -> str:
        with_prefill = [s for s in self.steps if s[1] > 0]
        decode = [s for s in self.steps if s[1] == 0]
        slowest = max(with_prefill, default=(0.0, 0, 0))
        t_pre, t_dec = sum(s[0] for s in with_prefill), sum(s[0] for s in decode)
        return (f"steps with prefill: {len(with_prefill)}, {t_pre:.2f} s ({sum(s[1] for s in with_prefill)} prompt "
                f"tokens; slowest {slowest[0]:.2f} s with {slowest[1]} prefill + {slowest[2]} decode tokens); "
                f"decode-only steps: {len(decode)}, {t_dec:.2f} s ({1e3 * t_dec / max(1, len(decode)):.1f} ms/step, "
                f"{sum(s[2] for s in decode) / max(t_dec, 1e-9):.0f} tok/s); "
                f"outside steps: {total - t_pre - t_dec:.2f} s")


def run_ours(llm: LLM, prompts, outputs, warmup: str) -> dict:
    """``warmup``: ``tiny`` (nano-vllm: 4 short requests) or ``full`` (the same prompts, 4 output tokens
    each: Triton compiles and autotunes fla's kernels for the prefill shapes before the clock starts)."""
    t0 = time.perf_counter()
    if warmup == "none":
        pass
    elif warmup == "full":
        llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    else:
        warm = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
        llm.generate([p[:200] for p in prompts[:4]], warm, use_tqdm=False)
    sync()
    print(f"warm-up ({warmup}): {time.perf_counter() - t0:.1f} s")
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in outputs]
    timer = StepTimer(llm.llm_engine)
    sync()
    start = time.perf_counter()
    results = llm.generate(prompts, params, use_tqdm=False)
    sync()
    seconds = time.perf_counter() - start
    timer.close()
    print(f"timed run: {timer.summary(seconds)}")
    tokens = sum(len(r.outputs[0].token_ids) for r in results)
    assert tokens == sum(outputs), (tokens, sum(outputs))
    return {"tokens": tokens, "seconds": seconds, "requests": len(prompts)}


def step_floor_bytes(engine, num_experts_hit: int | None) -> tuple[float, dict]:
    """The least bytes one decode step of the running batch moves: weights read (dense ones all,
    routed experts only those hit), each sequence's recurrent + conv states read and written, its
    KV entries read."""
    runner = engine.runner
    running = engine.scheduler.running
    context = sum(s.num_tokens for s in running) / max(1, len(running))
    experts, num_experts = 0, 1
    for module in runner.model.modules():
        if isinstance(module, FusedExperts):
            experts += sum(t.numel() * t.element_size() for t in module.parameters())
            num_experts = module.w13_weight.shape[0]
    dense = sum(t.numel() * t.element_size() for t in runner.model.parameters()) - experts
    hit = num_experts if num_experts_hit is None else min(num_experts, num_experts_hit)
    weights = dense + experts * hit / num_experts
    pool = runner.state_pool
    states = 2 * pool.bytes_total / (pool.num_slots + 1) * len(running)
    kv = runner.kv_cache[:, 0, 0].numel() * runner.kv_cache.element_size() * context * len(running)
    return weights + states + kv, dict(context=context, weights=weights, states=states, kv=kv)


def decode_step_profile(llm: LLM, prompts, batch: int, steps: int, top: int, bandwidth: float | None,
                        profile: tuple[str, ...] = ("CUDA graphs", "eager")) -> None:
    """Decode steps at a full batch: step time (per-step synced median, and ``steps`` steps back to
    back over one sync: what an overlapped engine pays), the floor (bytes / copy bandwidth of this
    run), then torch.profiler's kernels per step and top kernels for each mode in ``profile``."""
    engine = llm.llm_engine
    params = SamplingParams(temperature=0.0, max_tokens=10 * steps + 8, ignore_eos=True)
    for i in range(batch):
        engine.add_request(f"profile-{i}", prompts[i % len(prompts)][:512], params)
    while engine.scheduler.waiting or any(s.is_prefill for s in engine.scheduler.running):
        engine.step()
    times = []
    for _ in range(steps):
        sync()
        t0 = time.perf_counter()
        engine.step()
        sync()
        times.append(time.perf_counter() - t0)
    step_ms = 1e3 * sorted(times)[len(times) // 2]
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        engine.step()
    sync()
    piped_ms = 1e3 * (time.perf_counter() - t0) / steps
    running = engine.scheduler.running
    top_k = getattr(engine.hf_config, "num_experts_per_tok", None)
    moved, parts = step_floor_bytes(engine, None if top_k is None else len(running) * top_k)
    floor = f"; floor {moved / bandwidth * 1e3:.2f} ms at {bandwidth / 1e12:.2f} TB/s copy bandwidth: " \
            f"synced {step_ms / (moved / bandwidth * 1e3):.2f}x, back to back {piped_ms / (moved / bandwidth * 1e3):.2f}x" \
        if bandwidth else ""
    print(f"\ndecode step at batch {len(running)} (mean context {parts['context']:.0f}): median {step_ms:.2f} ms synced, "
          f"{piped_ms:.2f} ms back to back = {len(running) / piped_ms * 1e3:.0f} tok/s; at least {moved / 1e9:.2f} GB moved "
          f"(weights {parts['weights'] / 1e9:.2f}, states r+w {parts['states'] / 1e9:.2f}, KV {parts['kv'] / 1e9:.3f}){floor}")
    if not profile:
        for i in range(batch):
            engine.abort_request(f"profile-{i}")
        while engine.has_unfinished_requests():  # NOTE: a step still in flight (async scheduling)
            engine.step()
        return
    runner = engine.runner
    graphs = runner.cuda_graphs
    for label, use in (("CUDA graphs", graphs), ("eager", None)):
        if label not in profile or (label == "CUDA graphs" and graphs is None):
            continue
        runner.cuda_graphs = use
        engine.step()
        sync()
        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=activities) as prof:
            t0 = time.perf_counter()
            for _ in range(3):
                engine.step()
            sync()
        wall = (time.perf_counter() - t0) / 3 * 1e3
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        gpu_ms = sum(e.time_range.elapsed_us() for e in kernels) / 3 / 1e3
        print(f"\n# profile, 3 decode steps at batch {batch}, {label} ({wall:.2f} ms/step under the profiler): "
              f"{len(kernels) / 3:.0f} kernels and {gpu_ms:.2f} ms of GPU time per step")
        averages = prof.key_averages()
        try:
            table = averages.table(sort_by="device_time_total", row_limit=top, max_name_column_width=60)
        except Exception:  # older spelling
            table = averages.table(sort_by="cuda_time_total", row_limit=top, max_name_column_width=60)
        print(table)
    runner.cuda_graphs = graphs
    for i in range(batch):
        engine.abort_request(f"profile-{i}")
    while engine.has_unfinished_requests():
        engine.step()


@torch.inference_mode()
def run_transformers(ref, prompts, new_tokens: int, pad_id: int) -> dict:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    device = next(ref.parameters()).device
    ids, mask = ids.to(device), mask.to(device)

    def generate(n: int):
        return ref.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                            do_sample=False, pad_token_id=pad_id)

    generate(2)  # warm-up: the same prefill shapes, so compilation and autotuning are not timed
    sync()
    start = time.perf_counter()
    out = generate(new_tokens)
    sync()
    seconds = time.perf_counter() - start
    tokens = (out.shape[1] - width) * out.shape[0]
    return {"tokens": tokens, "seconds": seconds, "requests": len(prompts)}


def twin_check(model, ref) -> float:
    """Relative error of ours vs transformers' last-position logits on one 64-token prompt (bf16)."""
    from deltaserve.forward_context import forward_context, make_forward_context
    from deltaserve.state.pool import StatePool

    n, block = 64, 16
    device = next(model.parameters()).device
    ids = torch.randint(0, model.config.vocab_size, (n,), device=device)
    spec = model.kv_cache_spec()
    pool = StatePool(model.state_groups(), 1, device=device)
    kv = torch.zeros(spec.num_layers, 4, block, spec.entry_dim, dtype=spec.dtype, device=device)
    model.bind_caches(pool, kv)
    ctx = make_forward_context([n], [0], [1], block_tables=[[0, 1, 2, 3]], block_size=block, device=device)
    with torch.inference_mode():
        with forward_context(ctx):
            ours = model.compute_logits(model(ids, torch.arange(n, device=device)))
        theirs = ref(ids[None], use_cache=False).logits[0].float()
    return ((ours - theirs).norm() / theirs.norm()).item()


SHAPED = {"kimi_linear": make_kimi_shaped, "qwen3_next": make_qwen3_next_shaped}


def twin_check_fp32(args, shaped) -> None:
    """Ours vs transformers in float32 on the real dimensions cut to 4 layers (``shaped.FP32_OVERRIDES``).

    NOTE: in bf16 the two differ far more than rounding: a token whose router scores are nearly
    tied picks other experts in one of them, and 27 random layers amplify that. float32 shows
    whether they compute the same function.
    """
    overrides = dict(args.config_overrides or {})
    overrides.update(shaped.FP32_OVERRIDES)
    config_dir = shaped.write_config(Path(tempfile.mkdtemp()) / "fp32", args.num_experts, overrides)
    model = shaped.make_model(config_dir, torch.float32, args.device, seed=args.seed)
    ref = shaped.make_transformers_twin(model)
    print(f"logits rel err ours vs transformers, float32, 4 layers of the real dims: {twin_check(model, ref):.2e}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=sorted(SHAPED), default="kimi_linear", help="which shaped model")
    p.add_argument("--num-requests", type=int, default=256)
    p.add_argument("--min-len", type=int, default=100)
    p.add_argument("--max-len", type=int, default=1000)
    p.add_argument("--num-experts", type=int, default=32)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=16384)
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--async-scheduling", choices=["auto", "on", "off"], default="auto",
                   help="auto: the engine's default (on for CUDA); with it on and --repeat > 1, one more warmed run with it off")
    p.add_argument("--warmup", choices=["tiny", "full"], default="tiny")
    p.add_argument("--repeat", type=int, default=1, help="timed runs; each later one is warmed by the one before")
    p.add_argument("--skip-twin-check", action="store_true")
    p.add_argument("--hf-requests", type=int, default=32)
    p.add_argument("--hf-new-tokens", type=int, default=128)
    p.add_argument("--skip-hf", action="store_true")
    p.add_argument("--profile-steps", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    # NOTE: for a dry run of this script on the CPU: --device cpu --config-overrides '{...}' (small dims).
    p.add_argument("--device", default="cuda")
    p.add_argument("--config-overrides", default=None, help="JSON, or 'small' for the shaped model's SMALL_OVERRIDES")
    args = p.parse_args()
    shaped = SHAPED[args.model]
    if args.config_overrides is not None:
        small = args.config_overrides == "small"
        args.config_overrides = shaped.SMALL_OVERRIDES if small else json.loads(args.config_overrides)

    if args.device == "cuda":
        props = torch.cuda.get_device_properties(0)
        card = f"{props.name}, {props.total_memory / 2**30:.0f} GiB"
    else:
        card = "cpu (dry run)"
    import transformers

    print(f"# bench_e2e: {card}; torch {torch.__version__}, "
          f"transformers {transformers.__version__}; {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
    print(f"# command: {' '.join(sys.argv)}")
    tmp = Path(tempfile.mkdtemp())
    config_dir = shaped.write_config(tmp / args.model, args.num_experts, args.config_overrides)
    t0 = time.perf_counter()
    model = shaped.make_model(config_dir, torch.bfloat16, args.device, seed=args.seed)
    params = sum(t.numel() for t in model.parameters())
    print(f"model: {params / 1e9:.2f} B parameters ({params * 2 / 1e9:.1f} GB bf16), built in "
          f"{time.perf_counter() - t0:.1f} s")
    vocab = model.config.vocab_size
    prompts, outputs = draw_requests(args.num_requests, args.min_len, args.max_len, vocab, args.seed)

    ref = None
    if not args.skip_hf:
        ref = shaped.make_transformers_twin(model)
        twin = "skipped" if args.skip_twin_check else f"{twin_check(model, ref):.2e}"
        print(f"transformers twin: experts_implementation={ref.config._experts_implementation}; "
              f"logits rel err ours vs transformers (64 tokens, bf16): {twin}")

    from bench_startup import CompileLog

    compiles = CompileLog()
    t0 = time.perf_counter()
    llm = build_llm(config_dir, model, args)
    graphs = llm.llm_engine.runner.cuda_graphs
    print(f"engine ready in {time.perf_counter() - t0:.1f} s (CUDA graphs: "
          f"{graphs.sizes if graphs is not None else 'off'}); KV blocks {llm.llm_engine.config.num_kv_blocks}; "
          f"{len(compiles.events)} Triton compilations, {sum(t for _, t in compiles.events):.1f} s of them")
    runs = []
    for i in range(args.repeat):
        # NOTE: a repeat's warm-up is the run before it (the same shapes, every kernel compiled and tuned).
        warmup = args.warmup if i == 0 else "previous run"
        seen = len(compiles.events)
        ours = run_ours(llm, prompts, outputs, args.warmup if i == 0 else "none")
        late = compiles.since(seen)
        print(f"Triton compilations during this run (its warm-up included): {len(late)}, "
              f"{sum(t for _, t in late):.1f} s" + "".join(f"\n  {name}: {t:.2f} s" for name, t in late[:25]))
        ours["warmup"] = warmup
        runs.append(ours)
        ours_tps = ours["tokens"] / ours["seconds"]
        print(f"ours (warm-up: {warmup}): {ours['requests']} requests, {ours['tokens']} output tokens in "
              f"{ours['seconds']:.2f} s = {ours_tps:.0f} tok/s")
    metrics = llm.get_metrics()
    print("engine metrics (warm-up included): " + ", ".join(
        f"{k}={metrics[k]:.2f}" if isinstance(metrics[k], float) else f"{k}={metrics[k]}"
        for k in ("num_steps", "prefill_only_steps", "prefill_only_time_s", "decode_only_steps",
                  "decode_only_time_s", "mixed_steps", "mixed_time_s", "num_preemptions") if k in metrics))
    engine = llm.llm_engine
    overlapped = engine.async_scheduler
    if overlapped is not None and args.repeat > 1:
        # The same warmed run with the host work on the critical path (async scheduling off).
        engine.async_scheduler = None
        ours = run_ours(llm, prompts, outputs, "none")
        ours["warmup"] = "previous run, async scheduling off"
        runs.append(ours)
        print(f"ours (warm-up: previous run, async scheduling off): {ours['tokens'] / ours['seconds']:.0f} tok/s")
        engine.async_scheduler = overlapped
    if args.profile_steps:
        bandwidth = None
        if torch.cuda.is_available():
            from common import copy_bandwidth  # NOTE: imports triton

            bandwidth = copy_bandwidth()
        modes = [("async scheduling on", overlapped), ("async scheduling off", None)] if overlapped else [("sync", None)]
        full = min(args.max_num_seqs, 256)
        for i, (label, mode) in enumerate(modes):
            engine.async_scheduler = mode
            print(f"\n# decode steps, {label}")
            last = i == len(modes) - 1
            decode_step_profile(llm, prompts, 1, args.profile_steps, top=30, bandwidth=bandwidth,
                                profile=("CUDA graphs",) if last else ())
            decode_step_profile(llm, prompts, full, args.profile_steps, top=30, bandwidth=bandwidth,
                                profile=("CUDA graphs", "eager") if last else ())
        engine.async_scheduler = overlapped

    hf = None
    if ref is not None:
        del llm
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        subset = prompts[: args.hf_requests]
        pad = model.config.pad_token_id
        hf = run_transformers(ref, subset, args.hf_new_tokens, model.config.eos_token_id if pad is None else pad)
        print(f"transformers: {hf['requests']} requests, {hf['tokens']} output tokens in {hf['seconds']:.2f} s")

    print(f"\n## {card}: output tokens/s, {shaped.LABEL} ({args.num_experts} experts, bf16), "
          f"inputs/outputs uniform in [{args.min_len}, {args.max_len}]")
    print(f"| engine | requests | output tokens | seconds | tok/s |\n|---|---|---|---|---|")
    for run in runs:
        print(f"| deltaserve (LLM, cuda graphs {'on' if graphs is not None else 'off'}, warm-up: {run['warmup']}) | "
              f"{run['requests']} | {run['tokens']} | {run['seconds']:.2f} | {run['tokens'] / run['seconds']:.0f} |")
    if hf is not None:
        hf_tps = hf["tokens"] / hf["seconds"]
        print(f"| transformers generate (first {hf['requests']} prompts, {args.hf_new_tokens} new tokens each) | "
              f"{hf['requests']} | {hf['tokens']} | {hf['seconds']:.2f} | {hf_tps:.0f} |")
        for run in runs:
            speedup = run["tokens"] / run["seconds"] / hf_tps
            print(f"speed-up (warm-up: {run['warmup']}): {speedup:.1f}x (target >= 10x)")
    if ref is not None and not args.skip_twin_check:
        del ref, model
        gc.collect()
        twin_check_fp32(args, shaped)


if __name__ == "__main__":
    main()
