"""What the server reads from the engine: context length, vocabulary size, and gauges for ``/metrics``."""

from __future__ import annotations

from typing import Any

# Engine stats key -> (metric name, help). Other numeric keys are exported as ``engine_<key>``.
GAUGES = {
    "num_running": ("num_requests_running", "Sequences in the running batch."),
    "num_waiting": ("num_requests_waiting", "Sequences waiting for a state slot or KV blocks."),
    "state_slots_used": ("state_slots_used", "State-pool slots held by running sequences (cached ones count as free)."),
    "state_slots_total": ("state_slots_total", "State-pool slots (the null slot excluded)."),
    "state_pool_usage_perc": ("state_pool_usage_perc", "State-pool usage, 0 to 1 (cached checkpoints count as free)."),
    "kv_blocks_used": ("kv_blocks_used", "Paged KV blocks held by running sequences (cached ones count as free)."),
    "kv_blocks_total": ("kv_blocks_total", "Paged KV blocks."),
    "kv_cache_usage_perc": ("kv_cache_usage_perc", "KV-cache usage, 0 to 1 (blocks only the prefix cache holds count as free)."),
    "state_slots_cached": ("state_slots_cached", "State-pool slots held only by prefix-cache checkpoints (reusable)."),
    "kv_blocks_cached": ("kv_blocks_cached", "KV blocks held only by the prefix cache (reusable)."),
    "prompt_tokens_computed": ("prompt_tokens_computed", "Prompt tokens run through the model (cache hits excluded)."),
    "prefix_cache_queries": ("prefix_cache_queries", "Prefix-cache lookups (one per admitted sequence)."),
    "prefix_cache_hits": ("prefix_cache_hits", "Prefix-cache lookups that restored at least one token."),
    "prefix_cache_hit_tokens": ("prefix_cache_hit_tokens", "Prompt tokens restored from the prefix cache."),
    "prefix_cache_miss_tokens": ("prefix_cache_miss_tokens", "Prompt tokens of prefix-cache lookups not found in it."),
    "checkpoints_stored": ("prefix_cache_checkpoints_stored", "State checkpoints stored by the prefix cache."),
    "checkpoints_evicted": ("prefix_cache_checkpoints_evicted", "State checkpoints evicted from the prefix cache."),
    "checkpoints_captured": ("prefix_cache_checkpoints_captured", "State checkpoints saved inside a prefill forward."),
    "prefix_cache_checkpoints": ("prefix_cache_checkpoints", "State checkpoints held now."),
    "prefix_cache_bytes": ("prefix_cache_bytes", "Bytes the prefix cache holds (checkpoint states and KV blocks)."),
    "prefix_cache_budget_bytes": ("prefix_cache_budget_bytes", "The prefix cache's byte budget."),
    # Speculative decoding, vLLM's names (present only with a speculative_config).
    "spec_decode_num_drafts": ("spec_decode_num_drafts", "Verify rows with drafts (one per sequence and step)."),
    "spec_decode_num_draft_tokens": ("spec_decode_num_draft_tokens", "Draft tokens proposed and verified."),
    "spec_decode_num_accepted_tokens": ("spec_decode_num_accepted_tokens", "Draft tokens accepted."),
    "spec_decode_mean_acceptance_length": (
        "spec_decode_mean_acceptance_length", "Tokens emitted per verify row (1 + accepted / drafts)."),
}


def max_model_len(engine: Any) -> int:
    return int(engine.config.max_model_len)


def vocab_size(engine: Any) -> int:
    return int(engine.hf_config.vocab_size)


def engine_stats(engine: Any) -> dict[str, tuple[str, float]]:
    """Metric name -> (help, value), read on the engine-loop thread (consistent between two steps).

    ``prefix_cache_hit_rate`` is derived from the engine's counters: prompt tokens served from the
    cache over prompt tokens of added sequences.
    """
    stats = engine.get_metrics()
    out: dict[str, tuple[str, float]] = {}
    for key, (name, help_text) in GAUGES.items():
        if key in stats:
            out[name] = (help_text, stats[key])
    if "prefix_cache_hit_tokens" in stats:
        total = stats.get("prompt_tokens", 0)
        out["prefix_cache_hit_rate"] = ("Prompt tokens served from the prefix cache over all prompt tokens.",
                                        stats["prefix_cache_hit_tokens"] / total if total else 0.0)
    for key, value in sorted(stats.items()):
        if key not in GAUGES and isinstance(value, (int, float)) and not isinstance(value, bool):
            out[f"engine_{key}"] = (f"Engine counter {key} (see LLMEngine.stats).", value)
    return out
