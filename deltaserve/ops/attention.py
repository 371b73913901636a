"""Paged attention over the KV cache, both kinds: MLA over the compressed latent, GQA over per-head K/V.

MLA: the cache holds, per token, the latent ``[c_kv (kv_lora_rank, normed) | k_pe (qk_rope_head_dim)]``
shared by all heads (``entry_dim = kv_lora_rank + qk_rope_head_dim``). Keys and values are rebuilt
from the latent with the two halves of ``kv_b_proj``:
``k_nope = c_kv @ w_uk^T``, ``v = c_kv @ w_uv^T`` per head; the key is ``[k_nope | k_pe]``.

GQA: the cache holds, per token, ``[K (Hkv * D) | V (Hkv * D)]`` (see :mod:`deltaserve.kv.spec`);
query head ``h`` attends with KV head ``h // (H / Hkv)``.

Each public op dispatches (see :mod:`deltaserve.ops`): on CUDA inputs to the same-named function
of ``deltaserve/ops/gpu/attention.py`` when it imports, else to the torch reference ``<name>_ref``.
"""

from __future__ import annotations

from typing import Sequence

import torch

from deltaserve.kv.spec import split_kv
from deltaserve.ops import dispatch


def write_kv_cache_ref(latent: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Store ``latent[t]`` at flat position ``slot_mapping[t]`` of the cache, in place.

    latent: ``[T, E]``; kv_cache: ``[num_blocks, block_size, E]``; slot_mapping: ``[T]`` int64,
    ``block * block_size + offset``; rows with ``-1`` are not written (padding).
    """
    if latent.shape[-1] != kv_cache.shape[-1]:
        raise ValueError(f"latent entry_dim {latent.shape[-1]} != kv_cache entry_dim {kv_cache.shape[-1]}")
    if latent.shape[0] != slot_mapping.shape[0]:
        raise ValueError(f"latent has {latent.shape[0]} tokens but slot_mapping has {slot_mapping.shape[0]}")
    flat = kv_cache.view(-1, kv_cache.shape[-1])
    valid = slot_mapping >= 0
    flat.index_copy_(0, slot_mapping[valid], latent[valid].to(kv_cache.dtype))


def _as_list(x: torch.Tensor | Sequence[int]) -> list[int]:
    return x.tolist() if isinstance(x, torch.Tensor) else list(x)


def _sequence_blocks(block_tables: torch.Tensor, b: int, seq_len: int, block_size: int) -> torch.Tensor:
    """The cache blocks holding sequence ``b``'s ``seq_len`` tokens, int64; ValueError if one is missing."""
    blocks = block_tables[b, : -(-seq_len // block_size)].long()
    if bool((blocks < 0).any()):
        raise ValueError(f"sequence {b}: block table {block_tables[b].tolist()} has no block for {seq_len} tokens")
    return blocks


def _causal_softmax(scores: torch.Tensor, seq_len: int, num_new: int) -> torch.Tensor:
    """Softmax of ``scores [H, num_new, seq_len]`` over the keys each new token sees (positions up to its own)."""
    query_pos = torch.arange(seq_len - num_new, seq_len, device=scores.device)
    key_pos = torch.arange(seq_len, device=scores.device)
    scores = scores.masked_fill(key_pos[None, None, :] > query_pos[None, :, None], float("-inf"))
    return torch.softmax(scores, dim=-1)


def paged_mla_attention_ref(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    w_uk: torch.Tensor,
    w_uv: torch.Tensor,
    *,
    cu_seqlens: torch.Tensor | Sequence[int],
    seq_lens: torch.Tensor | Sequence[int],
    block_tables: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Causal multi-head attention of each sequence's new tokens over its whole cached sequence.

    q: ``[T, H, Dn + Dr]`` (nope part first); kv_cache: ``[num_blocks, block_size, R + Dr]``, already
    holding this step's tokens; w_uk: ``[H, Dn, R]``; w_uv: ``[H, Dv, R]``. ``cu_seqlens`` ``[B+1]``
    splits the T new tokens by sequence; ``seq_lens`` ``[B]`` counts each sequence's tokens *including*
    the new ones (so new token ``i`` of a sequence with ``n`` new tokens sits at position
    ``seq_len - n + i`` and sees keys ``0..`` that position); ``block_tables`` ``[B, max_blocks]``.
    Returns ``[T, H, Dv]`` in q's dtype; the math runs in float32.
    """
    num_heads, nope_dim, rank = w_uk.shape
    rope_dim = q.shape[-1] - nope_dim
    if kv_cache.shape[-1] != rank + rope_dim:
        raise ValueError(f"kv_cache entry_dim {kv_cache.shape[-1]} != kv_lora_rank {rank} + rope dim {rope_dim}")
    block_size = kv_cache.shape[1]
    cu = _as_list(cu_seqlens)
    lens = _as_list(seq_lens)
    w_uk32, w_uv32 = w_uk.float(), w_uv.float()
    out = q.new_empty(q.shape[0], num_heads, w_uv.shape[1])
    for b, seq_len in enumerate(lens):
        start, end = cu[b], cu[b + 1]
        num_new = end - start
        if num_new == 0:
            continue
        blocks = _sequence_blocks(block_tables, b, seq_len, block_size)
        latent = kv_cache[blocks].reshape(-1, kv_cache.shape[-1])[:seq_len].float()  # [L, R + Dr]
        c_kv, k_pe = latent.split([rank, rope_dim], dim=-1)
        k_nope = torch.einsum("lr,hdr->lhd", c_kv, w_uk32)  # [L, H, Dn]
        value = torch.einsum("lr,hdr->lhd", c_kv, w_uv32)  # [L, H, Dv]
        q_nope, q_pe = q[start:end].float().split([nope_dim, rope_dim], dim=-1)
        scores = torch.einsum("qhd,lhd->hql", q_nope, k_nope) + torch.einsum("qhd,ld->hql", q_pe, k_pe)
        probs = _causal_softmax(scores * scale, seq_len, num_new)
        out[start:end] = torch.einsum("hql,lhd->qhd", probs, value).to(out.dtype)
    return out


def paged_gqa_attention_ref(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    *,
    num_kv_heads: int,
    cu_seqlens: torch.Tensor | Sequence[int],
    seq_lens: torch.Tensor | Sequence[int],
    block_tables: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Causal grouped-query attention of each sequence's new tokens over its whole cached sequence.

    q: ``[T, H, D]``; kv_cache: ``[num_blocks, block_size, 2 * Hkv * D]``, already holding this step's
    keys and values; ``cu_seqlens``, ``seq_lens`` and ``block_tables`` as in
    :func:`paged_mla_attention_ref`. Returns ``[T, H, D]`` in q's dtype; the math runs in float32.
    """
    num_heads, head_dim = q.shape[1], q.shape[2]
    if num_heads % num_kv_heads != 0:
        raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
    k_cache, v_cache = split_kv(kv_cache, num_kv_heads, head_dim)
    block_size = kv_cache.shape[1]
    cu, lens = _as_list(cu_seqlens), _as_list(seq_lens)
    out = q.new_empty(q.shape)
    for b, seq_len in enumerate(lens):
        start, end = cu[b], cu[b + 1]
        num_new = end - start
        if num_new == 0:
            continue
        blocks = _sequence_blocks(block_tables, b, seq_len, block_size)
        # [L, H, D]: each KV head repeated for its group of query heads
        keys = k_cache[blocks].reshape(-1, num_kv_heads, head_dim)[:seq_len].float()
        values = v_cache[blocks].reshape(-1, num_kv_heads, head_dim)[:seq_len].float()
        keys = keys.repeat_interleave(num_heads // num_kv_heads, dim=1)
        values = values.repeat_interleave(num_heads // num_kv_heads, dim=1)
        scores = torch.einsum("qhd,lhd->hql", q[start:end].float(), keys) * scale
        probs = _causal_softmax(scores, seq_len, num_new)
        out[start:end] = torch.einsum("hql,lhd->qhd", probs, values).to(out.dtype)
    return out


def write_kv_cache(latent: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """See :func:`write_kv_cache_ref`."""
    dispatch("attention", "write_kv_cache", latent, write_kv_cache_ref)(latent, kv_cache, slot_mapping)


def paged_mla_attention(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    w_uk: torch.Tensor,
    w_uv: torch.Tensor,
    *,
    cu_seqlens: torch.Tensor | Sequence[int],
    seq_lens: torch.Tensor | Sequence[int],
    block_tables: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """See :func:`paged_mla_attention_ref`."""
    impl = dispatch("attention", "paged_mla_attention", q, paged_mla_attention_ref)
    return impl(
        q, kv_cache, w_uk, w_uv, cu_seqlens=cu_seqlens, seq_lens=seq_lens, block_tables=block_tables, scale=scale
    )


def paged_gqa_attention(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    *,
    num_kv_heads: int,
    cu_seqlens: torch.Tensor | Sequence[int],
    seq_lens: torch.Tensor | Sequence[int],
    block_tables: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """See :func:`paged_gqa_attention_ref`; on CUDA the Triton kernel of ``ops/gpu/attention_gqa.py``."""
    impl = dispatch("attention_gqa", "paged_gqa_attention", q, paged_gqa_attention_ref)
    return impl(
        q, kv_cache, num_kv_heads=num_kv_heads, cu_seqlens=cu_seqlens, seq_lens=seq_lens,
        block_tables=block_tables, scale=scale,
    )
