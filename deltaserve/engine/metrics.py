"""Engine counters: tokens in and out, and step time split by what the step computed."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class EngineMetrics:
    """Cumulative since the engine started.

    - ``prompt_tokens``: prompt tokens of added sequences (a prompt counts once per sequence of ``n``).
    - ``prompt_tokens_computed``: tokens fed to forwards as prefill chunks, recomputation after
      preemption included, prefix-cache hits excluded.
    - ``generation_tokens``: sampled tokens.
    - ``*_time_s`` / ``*_steps``: wall time and count of steps that ran only prefill chunks, only
      decodes, or both (``mixed``); ``decode_only_tokens`` are the tokens of decode-only steps.
    - ``async_discarded_tokens``: with async scheduling, tokens of rows computed for sequences that
      had stopped (finished or aborted) while the step ran; the counts above leave them out.
    """

    num_requests: int = 0
    num_finished_requests: int = 0
    num_aborted_requests: int = 0
    prompt_tokens: int = 0
    prompt_tokens_computed: int = 0
    generation_tokens: int = 0
    num_steps: int = 0
    prefill_only_steps: int = 0
    prefill_only_time_s: float = 0.0
    prefill_only_tokens: int = 0
    decode_only_steps: int = 0
    decode_only_time_s: float = 0.0
    decode_only_tokens: int = 0
    mixed_steps: int = 0
    mixed_time_s: float = 0.0
    async_discarded_tokens: int = 0

    def record_step(self, num_prefill_tokens: int, num_decode_tokens: int, num_sampled: int, seconds: float) -> None:
        self.num_steps += 1
        self.prompt_tokens_computed += num_prefill_tokens
        self.generation_tokens += num_sampled
        if num_decode_tokens == 0:
            self.prefill_only_steps += 1
            self.prefill_only_time_s += seconds
            self.prefill_only_tokens += num_prefill_tokens
        elif num_prefill_tokens == 0:
            self.decode_only_steps += 1
            self.decode_only_time_s += seconds
            self.decode_only_tokens += num_decode_tokens
        else:
            self.mixed_steps += 1
            self.mixed_time_s += seconds

    def as_dict(self) -> dict:
        return asdict(self)
