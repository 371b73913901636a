"""Paged MLA attention and the KV cache write vs a dense float64 recomputation written here."""

from __future__ import annotations

import pytest
import torch
from conftest import rel_err

from deltaserve.ops.attention import paged_mla_attention, write_kv_cache

H, DN, DR, DV, R = 3, 8, 4, 6, 10
BLOCK = 4
NUM_BLOCKS = 12


def dense_reference(q, latents, w_uk, w_uv, num_computed, scale):
    """Per sequence, per query token: softmax over keys 0..pos in float64, keys/values expanded from the latent."""
    outs = []
    start = 0
    for latent, computed in zip(latents, num_computed):
        num_new = latent.shape[0] - computed
        lat = latent.double()
        k_nope = torch.einsum("lr,hdr->lhd", lat[:, :R], w_uk.double())
        keys = torch.cat([k_nope, lat[:, None, R:].expand(-1, H, -1)], dim=-1)  # [L, H, DN + DR]
        values = torch.einsum("lr,hdr->lhd", lat[:, :R], w_uv.double())
        for i in range(num_new):
            pos = computed + i
            qi = q[start + i].double()  # [H, DN + DR]
            scores = torch.einsum("hd,lhd->hl", qi, keys[: pos + 1]) * scale
            outs.append(torch.einsum("hl,lhd->hd", scores.softmax(-1), values[: pos + 1]))
        start += num_new
    return torch.stack(outs)


def test_write_kv_cache_writes_slots_and_skips_padding():
    cache = torch.full((NUM_BLOCKS, BLOCK, R + DR), float("nan"))
    latent = torch.randn(4, R + DR)
    slots = torch.tensor([5, -1, 17, 0])
    write_kv_cache(latent, cache, slots)
    flat = cache.view(-1, R + DR)
    assert torch.equal(flat[5], latent[0]) and torch.equal(flat[17], latent[2]) and torch.equal(flat[0], latent[3])
    untouched = torch.ones(flat.shape[0], dtype=torch.bool)
    untouched[[0, 5, 17]] = False
    assert flat[untouched].isnan().all()


def test_paged_mla_attention_matches_dense_recomputation():
    # three sequences: a fresh prompt, a decode step after 9 cached tokens, a chunk after 3 cached tokens
    seq_lens, num_computed = [6, 10, 8], [0, 9, 3]
    tables = [[7, 2], [0, 11, 5], [9, 3]]
    latents = [torch.randn(n, R + DR) for n in seq_lens]
    cache = torch.full((NUM_BLOCKS, BLOCK, R + DR), float("nan"))
    for latent, table in zip(latents, tables):
        for pos in range(latent.shape[0]):
            cache[table[pos // BLOCK], pos % BLOCK] = latent[pos]
    num_new = [n - c for n, c in zip(seq_lens, num_computed)]
    q = torch.randn(sum(num_new), H, DN + DR)
    w_uk, w_uv = torch.randn(H, DN, R) * 0.3, torch.randn(H, DV, R) * 0.3
    block_tables = torch.full((3, 3), -1, dtype=torch.int32)
    for i, table in enumerate(tables):
        block_tables[i, : len(table)] = torch.tensor(table)
    cu = torch.tensor([0, num_new[0], num_new[0] + num_new[1], sum(num_new)], dtype=torch.int32)
    scale = (DN + DR) ** -0.5
    out = paged_mla_attention(
        q, cache, w_uk, w_uv, cu_seqlens=cu, seq_lens=torch.tensor(seq_lens), block_tables=block_tables, scale=scale
    )
    expected = dense_reference(q, latents, w_uk, w_uv, num_computed, scale)
    assert out.shape == (sum(num_new), H, DV)
    assert not out.isnan().any()
    assert rel_err(out, expected) < 1e-5


def test_paged_mla_attention_rejects_a_block_table_too_short():
    cache = torch.zeros(NUM_BLOCKS, BLOCK, R + DR)
    q = torch.randn(1, H, DN + DR)
    tables = torch.tensor([[3, -1]], dtype=torch.int32)
    with pytest.raises(ValueError, match="block table"):
        paged_mla_attention(
            q, cache, torch.randn(H, DN, R), torch.randn(H, DV, R),
            cu_seqlens=[0, 1], seq_lens=[6], block_tables=tables, scale=1.0,
        )  # fmt: skip
