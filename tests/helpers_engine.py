"""Engine test helpers: transformers' greedy generation as the reference, and a free-resources check."""

from __future__ import annotations

import random

import torch


class GreedyReference:
    """transformers' ``generate(do_sample=False)`` of a reference model in float32, memoised per prompt."""

    def __init__(self, ref_model):
        self.model = ref_model
        self._cache: dict[tuple, list[int]] = {}

    @torch.no_grad()
    def __call__(self, prompt: list[int], max_new_tokens: int) -> list[int]:
        key = (tuple(prompt), max_new_tokens)
        if key not in self._cache:
            out = self.model.generate(
                torch.tensor([prompt]), do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=None
            )
            self._cache[key] = out[0, len(prompt) :].tolist()
        return self._cache[key]


def random_prompts(lengths: list[int], seed: int = 0, vocab: int = 256) -> list[list[int]]:
    """Random byte-token prompts (ids below the tiny tokenizer's special tokens)."""
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(n)] for n in lengths]


def assert_all_free(stats: dict) -> None:
    """No request is left and none holds a slot or KV block; what is still in use is exactly what the
    prefix cache's own bookkeeping says it holds (its checkpoints' slots and the blocks they reference)."""
    assert stats["num_running"] == 0 and stats["num_waiting"] == 0, stats
    assert stats["state_slots_used"] == stats["kv_blocks_used"] == 0, stats
    assert stats["state_pool_usage_perc"] == stats["kv_cache_usage_perc"] == 0, stats
    assert stats["state_slots_cached"] == stats.get("prefix_cache_checkpoints", 0), stats
    assert stats["kv_blocks_cached"] == stats.get("prefix_cache_blocks_held", 0), stats


def assert_all_free_after_reset(engine) -> None:
    """``assert_all_free``, then dropping the prefix cache returns every slot and block to the free lists."""
    assert_all_free(engine.get_metrics())
    engine.reset_prefix_cache()
    stats = engine.get_metrics()
    assert stats["state_slots_cached"] == 0 and stats["kv_blocks_cached"] == 0, stats
