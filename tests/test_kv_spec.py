"""The KV-cache spec: one paged layout for MLA latents and per-head K/V, bytes from the spec."""

from __future__ import annotations

import pytest
import torch

from deltaserve.kv.spec import KVCacheSpec, split_kv


def test_bytes_per_block_for_both_kinds():
    mla = KVCacheSpec.mla(7, 512, 64, torch.bfloat16)  # Kimi-Linear-48B
    assert (mla.kind, mla.entry_dim, mla.bytes_per_token, mla.bytes_per_block(16)) == ("mla", 576, 1152, 7 * 16 * 1152)
    gqa = KVCacheSpec.gqa(12, 2, 256, torch.bfloat16)  # Qwen3-Next-80B
    assert (gqa.kind, gqa.entry_dim, gqa.bytes_per_token, gqa.bytes_per_block(16)) == ("gqa", 1024, 2048, 12 * 16 * 2048)


def test_split_kv_views_keys_then_values_of_each_token_without_a_copy():
    cache = torch.arange(3 * 4 * 2 * 2 * 5, dtype=torch.float32).view(3, 4, 2 * 2 * 5)
    k, v = split_kv(cache, num_kv_heads=2, head_dim=5)
    assert k.shape == v.shape == (3, 4, 2, 5)
    assert torch.equal(k[1, 2].flatten(), cache[1, 2, :10]) and torch.equal(v[1, 2].flatten(), cache[1, 2, 10:])
    k[0, 0, 1, 0] = -1.0
    assert cache[0, 0, 5] == -1.0
    with pytest.raises(ValueError, match="entry_dim 20 != 2 x 3 KV heads x head_dim 5"):
        split_kv(cache, num_kv_heads=3, head_dim=5)


def test_check_cache_names_the_expected_shape():
    spec = KVCacheSpec.gqa(2, 2, 8, torch.float32)
    spec.check_cache(torch.zeros(2, 5, 4, 32))
    with pytest.raises(ValueError, match=r"kv_cache must be \[2, num_blocks, block_size, 32\], got \(2, 5, 4, 16\)"):
        spec.check_cache(torch.zeros(2, 5, 4, 16))
