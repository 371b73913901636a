"""Engine warm-up: the shape classes the scheduler produces, run once at start and forgotten.

Triton compiles a kernel once per specialisation (which integer arguments are 1 or multiples of 16,
which pointers are aligned, constexpr flags such as "has an initial state") and fla autotunes each
kernel on its first call. A warm-up of one fresh prompt leaves the other classes to the first
requests that produce them (measured on an H200: a 16k-token step stalled ~32 s after a one-prompt
warm-up). So the warm-up runs, with odd and aligned lengths:

1. a full token budget of fresh prompts (one prompt where ``max_model_len`` allows, else as few as
   fit; no initial state; the total a multiple of 16, as a full budget usually is);
2. the continuation together with three new short prompts (varlen, mixed initial states, an odd total);
3. decode steps of several sequences, and a new prompt arriving while they decode (a mixed step);
4. decodes to the end (each CUDA-graph batch size was captured at start already), then 16 fresh
   prompts in one step (Triton specialises integer arguments that are multiples of 16: a step's
   token count, and for some kernels its sequence count);
5. with prefix caching on, the steps above take their in-forward checkpoints (a prefill with
   checkpoints runs its own kernel specialisations, ``ops/gpu/chunk_states.py``), and the long
   prompt comes again to hit them (the restore copies and a prefill from a restored state).
   Afterwards the cache is emptied and its counters zeroed.

Compiled kernels and autotuning results land in Triton's on-disk cache (``TRITON_CACHE_DIR``, by
default ``~/.triton/cache``), so a restart skips most of this work.
"""

from __future__ import annotations

import logging
import time

from deltaserve.engine.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

PREFIX = "__warmup__"


def warmup_prompt_lengths(max_num_batched_tokens: int, max_model_len: int) -> tuple[list[int], list[int], int]:
    """``(first prompts, short prompts joining their continuation, prompt joining the decodes)``, each
    fitting ``max_model_len`` with room for the warm-up's output tokens. The first prompts total a
    budget and a half, so the first step is a full budget of fresh prompts and the second continues one."""
    limit = max(1, max_model_len - 8)
    total = max_num_batched_tokens + max_num_batched_tokens // 2 + 5
    firsts = [limit] * (total // limit) + ([total % limit] if total % limit else [])
    shorts = [min(n, limit) for n in (37, 64, 129)]
    return firsts, shorts, min(77, limit)


def run_warmup(engine) -> float:
    """Run the warm-up plan on an idle ``engine``; returns its seconds. Leaves no request, slot, block,
    prefix-cache entry or counter behind."""
    if engine.has_unfinished_requests():
        raise ValueError("warmup needs an idle engine: requests are running or waiting")
    start = time.perf_counter()
    config = engine.config
    firsts, shorts, joiner = warmup_prompt_lengths(config.max_num_batched_tokens, config.max_model_len)
    # NOTE: room for the short prompts and the joiner beside them (a full budget needs more prompts
    # than max_num_seqs only with a tiny max_model_len: then the first step holds what fits).
    firsts = firsts[: max(1, config.max_num_seqs - len(shorts) - 1)]
    wide = 16 if config.max_num_seqs >= 16 and 16 * shorts[0] <= config.max_num_batched_tokens else 0
    vocab = engine.hf_config.vocab_size

    def prompt(n: int, salt: int) -> list[int]:
        return [(7 * i + 13 * salt + 1) % vocab for i in range(n)]

    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    ids = []

    def add(n: int, salt: int | None = None) -> None:
        ids.append(f"{PREFIX}{len(ids)}")
        engine.add_request(ids[-1], prompt(n, len(ids) if salt is None else salt), params)

    def finish() -> None:
        while engine.has_unfinished_requests():
            engine.step()

    try:
        for n in firsts:
            add(n)
        engine.step()  # 1. a full budget of fresh prompts
        for n in shorts:
            add(n)
        engine.step()  # 2. the continuation with fresh short prompts
        engine.step()
        add(joiner)  # 3. a prompt arriving among decodes
        finish()
        for _ in range(wide):
            add(shorts[0])  # 4. sixteen fresh prompts in one step
        finish()
        if engine.prefix_cache is not None:
            add(firsts[0], salt=1)  # 5. the first prompt again: a hit on its checkpoints
            finish()
    finally:
        for request_id in ids:
            if request_id in engine.requests:
                engine.abort_request(request_id)
        if engine.prefix_cache is not None:
            engine.prefix_cache.reset()
            engine.prefix_cache.zero_counters()
    seconds = time.perf_counter() - start
    logger.info("warm-up: %.1f s (prompts of %s, %s, %d and %d x %d tokens)", seconds, firsts, shorts, joiner, wide,
                shorts[0])
    return seconds
