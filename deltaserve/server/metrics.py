"""Server metrics in Prometheus' text format (version 0.0.4).

Latencies are measured here, from the server's own timestamps (``time.monotonic()``): time to first
token from the request's arrival at the handler, per-token latency from the gaps between the steps
that gave a request new tokens. Engine counters (running, waiting, slots, blocks, prefix-cache hit
rate) are read from the engine at scrape time.
"""

from __future__ import annotations

import bisect
import math
import threading
from typing import Any

# NOTE: vLLM's buckets, so dashboards built for vLLM read these the same way.
TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0
)
TPOT_BUCKETS = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0
)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0)


class Histogram:
    """Cumulative-bucket histogram (not thread-safe; ``ServerMetrics`` holds the lock)."""

    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)  # the last one is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float, times: int = 1) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += times
        self.sum += value * times
        self.count += times

    def lines(self, name: str, labels: str) -> list[str]:
        out, running = [], 0
        for bound, count in zip(self.buckets + (math.inf,), self.counts):
            running += count
            le = "+Inf" if math.isinf(bound) else repr(float(bound))
            out.append(f'{name}_bucket{{{labels},le="{le}"}} {running}')
        out.append(f"{name}_sum{{{labels}}} {self.sum!r}")
        out.append(f"{name}_count{{{labels}}} {self.count}")
        return out


class ServerMetrics:
    """Counters and latency histograms, written by the engine-loop thread, read by ``/metrics``."""

    def __init__(self):
        self._lock = threading.Lock()
        self.ttft = Histogram(TTFT_BUCKETS)
        self.per_token = Histogram(TPOT_BUCKETS)
        self.e2e = Histogram(E2E_BUCKETS)
        self.generation_tokens = 0
        self.prompt_tokens = 0
        self.finished: dict[str, int] = {}
        self.rejected = 0

    def on_tokens(self, stream: Any, num_new_tokens: int, now: float) -> None:
        """A step gave ``stream`` ``num_new_tokens`` tokens (over all its ``n`` sequences)."""
        if num_new_tokens <= 0:
            return
        with self._lock:
            self.generation_tokens += num_new_tokens
            if stream.first_token_time is None:
                stream.first_token_time = now
                self.ttft.observe(now - stream.arrival_time)
            elif stream.last_token_time is not None:
                # NOTE: one step gives each of the n sequences one token: the gap is per token.
                self.per_token.observe(now - stream.last_token_time, times=num_new_tokens)
            stream.last_token_time = now

    def on_finished(self, stream: Any, finish_reason: str | None, now: float, num_prompt_tokens: int = 0) -> None:
        with self._lock:
            reason = finish_reason or "unknown"
            self.finished[reason] = self.finished.get(reason, 0) + 1
            self.prompt_tokens += num_prompt_tokens
            self.e2e.observe(now - stream.arrival_time)

    def on_rejected(self) -> None:
        with self._lock:
            self.rejected += 1

    def render(self, engine_stats: dict[str, float], model_name: str) -> str:
        """The whole exposition: ``engine_stats`` (gauges, already read from the engine) + our own."""
        labels = f'model_name="{_escape(model_name)}"'
        lines: list[str] = []

        def metric(name: str, kind: str, help_text: str, samples: list[str]) -> None:
            lines.append(f"# HELP {name} {help_text}")
            lines.append(f"# TYPE {name} {kind}")
            lines.extend(samples)

        for key, (help_text, value) in engine_stats.items():
            metric(f"deltaserve_{key}", "gauge", help_text, [f"deltaserve_{key}{{{labels}}} {_number(value)}"])
        with self._lock:
            metric("deltaserve_generation_tokens_total", "counter", "Tokens generated.",
                   [f"deltaserve_generation_tokens_total{{{labels}}} {self.generation_tokens}"])
            metric("deltaserve_prompt_tokens_total", "counter", "Prompt tokens of finished requests.",
                   [f"deltaserve_prompt_tokens_total{{{labels}}} {self.prompt_tokens}"])
            metric("deltaserve_request_success_total", "counter", "Requests ended, by finish reason.",
                   [f'deltaserve_request_success_total{{{labels},finished_reason="{_escape(r)}"}} {c}'
                    for r, c in sorted(self.finished.items())])
            metric("deltaserve_request_rejected_total", "counter", "Requests refused with 503 (queue full).",
                   [f"deltaserve_request_rejected_total{{{labels}}} {self.rejected}"])
            metric("deltaserve_time_to_first_token_seconds", "histogram", "Arrival to first generated token.",
                   self.ttft.lines("deltaserve_time_to_first_token_seconds", labels))
            metric("deltaserve_time_per_output_token_seconds", "histogram", "Gap between a request's tokens.",
                   self.per_token.lines("deltaserve_time_per_output_token_seconds", labels))
            metric("deltaserve_e2e_request_latency_seconds", "histogram", "Arrival to the end of a request.",
                   self.e2e.lines("deltaserve_e2e_request_latency_seconds", labels))
        return "\n".join(lines) + "\n"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, int):
        return str(value)
    return repr(float(value))
