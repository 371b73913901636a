"""Engine test helpers: transformers' greedy generation as the reference, and a free-resources check."""

from __future__ import annotations

import random

import torch


class GreedyReference:
    """transformers' ``KimiLinearForCausalLM.generate(do_sample=False)`` in float32, memoised per prompt."""

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
    """Every state slot and KV block is back in the free lists, no request is left."""
    assert stats["state_slots_used"] == 0, stats
    assert stats["kv_blocks_used"] == 0, stats
    assert stats["num_running"] == 0 and stats["num_waiting"] == 0, stats
