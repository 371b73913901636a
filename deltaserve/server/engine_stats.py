"""What the server reads from the engine: context length, vocabulary size, and gauges for ``/metrics``."""

from __future__ import annotations

from typing import Any

# Engine stats key -> (metric name, help). Other numeric keys are exported as ``engine_<key>``.
GAUGES = {
    "num_running": ("num_requests_running", "Sequences in the running batch."),
    "num_waiting": ("num_requests_waiting", "Sequences waiting for a state slot or KV blocks."),
    "state_slots_used": ("state_slots_used", "State-pool slots held (requests and cached checkpoints)."),
    "state_slots_total": ("state_slots_total", "State-pool slots (the null slot excluded)."),
    "kv_blocks_used": ("kv_blocks_used", "Paged KV blocks held (requests and the prefix cache)."),
    "kv_blocks_total": ("kv_blocks_total", "Paged KV blocks."),
}


def max_model_len(engine: Any) -> int:
    return int(engine.config.max_model_len)


def vocab_size(engine: Any) -> int:
    return int(engine.hf_config.vocab_size)


def engine_stats(engine: Any) -> dict[str, tuple[str, float]]:
    """Metric name -> (help, value), read on the engine-loop thread (consistent between two steps).

    The prefix-cache hit rate is exported when the engine reports one (any ``*hit_rate`` key).
    """
    stats = engine.get_metrics()
    out: dict[str, tuple[str, float]] = {}
    for key, (name, help_text) in GAUGES.items():
        if key in stats:
            out[name] = (help_text, stats[key])
    # NOTE: without a reported rate, derive one from the engine's counters: prompt tokens served
    # from the cache over prompt tokens of added sequences.
    if not any(key.endswith("hit_rate") for key in stats) and "prefix_cache_hit_tokens" in stats:
        total = stats.get("prompt_tokens", 0)
        out["prefix_cache_hit_rate"] = ("Prompt tokens served from the prefix cache over all prompt tokens.",
                                        stats["prefix_cache_hit_tokens"] / total if total else 0.0)
    for key, value in sorted(stats.items()):
        if key in GAUGES or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if key.endswith("hit_rate"):
            name = key if key.startswith("prefix_cache") else f"prefix_cache_{key}"
            out[name] = ("Prefix-cache hit rate reported by the engine.", value)
        else:
            out[f"engine_{key}"] = (f"Engine counter {key} (see LLMEngine.stats).", value)
    return out
