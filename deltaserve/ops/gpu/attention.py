"""Paged MLA attention on the GPU: weight absorption plus one Triton kernel over the latent cache.

Same contract as :mod:`deltaserve.ops.attention`. With absorption the keys and values are never
expanded per head: ``q_nope @ w_uk`` moves each query into the latent space (``[T, H, R]``), the
kernel attends over the cached latents ``[c_kv | k_pe]`` (scores ``q_lat . c_kv + q_pe . k_pe``,
values ``c_kv``), and ``@ w_uv^T`` maps the latent output back to ``[T, H, Dv]``.

One kernel serves decode and (chunked) prefill: a program is one new token, a group of heads and
one of ``splits`` slices of that token's causal key range, walked through the block table with an
online softmax. With few tokens (decode at small batch) a token's keys are split over up to
``MAX_SPLITS`` programs so that the step fills the GPU; a second kernel merges the slices by their
log-sum-exp (flash-decoding). The split count depends on the token count only, so a captured CUDA
graph keeps it. Sequence lengths are read on the device, so the op never syncs with the host and is
CUDA-graph safe when ``seq_lens`` and ``cu_seqlens`` are device tensors.
"""

from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

# MLA tiles (head rows per program, keys per iteration, warps, stages; tl.dot needs at least 16 head
# rows, fewer heads are masked): from benchmarks/bench_mla_decode.py --sweep on an H200. 32 heads a
# program read each key once for all heads (1.45x faster at batch 256), 16 leave more programs to a
# small batch (split keys); the wide tile from WIDE_TOKENS tokens.
NARROW_TILE = (16, 32, 4, 2)
WIDE_TILE = (32, 32, 4, 3)
WIDE_TOKENS = 128


def mla_tile(num_tokens: int) -> tuple[int, int, int, int]:
    """(BLOCK_H, BLOCK_N, num_warps, num_stages) of the MLA kernel for a step of ``num_tokens`` tokens."""
    return WIDE_TILE if num_tokens >= WIDE_TOKENS else NARROW_TILE


# Key-range splits: enough programs for about TARGET_PROGRAMS in all, at most MAX_SPLITS per token.
# Two per SM of an H200 (benchmarks/bench_mla_decode.py: 264 beat 528 and up at batch 16 and 64, tied
# at batch 1; more splits only pay once a context is long).
TARGET_PROGRAMS = 264
MAX_SPLITS = 16


def num_splits(num_tokens: int, num_head_blocks: int) -> int:
    """Slices of each token's key range: a power of two, 1 once the tokens alone fill the GPU."""
    want = TARGET_PROGRAMS // max(1, num_tokens * num_head_blocks)
    return max(1, min(MAX_SPLITS, triton.next_power_of_2(want + 1) // 2))


@triton.jit
def _write_kv_kernel(latent, cache, slot_mapping, E, stride_lt, BE: tl.constexpr):
    t = tl.program_id(0)
    slot = tl.load(slot_mapping + t)
    if slot >= 0:
        o_e = tl.arange(0, BE)
        m_e = o_e < E
        row = tl.load(latent + t.to(tl.int64) * stride_lt + o_e, mask=m_e)
        tl.store(cache + slot.to(tl.int64) * E + o_e, row.to(cache.dtype.element_ty), mask=m_e)


def write_kv_cache(latent: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Store ``latent[t]`` at flat position ``slot_mapping[t]`` (``-1``: skipped) of ``kv_cache``, one launch.

    latent ``[T, E]``; kv_cache ``[num_blocks, block_size, E]`` contiguous; slot_mapping ``[T]`` int.
    """
    num_tokens, entry_dim = latent.shape
    if kv_cache.shape[-1] != entry_dim:
        raise ValueError(f"latent entry_dim {entry_dim} != kv_cache entry_dim {kv_cache.shape[-1]}")
    if slot_mapping.shape[0] != num_tokens:
        raise ValueError(f"latent has {num_tokens} tokens but slot_mapping has {slot_mapping.shape[0]}")
    if not kv_cache.is_contiguous():
        raise ValueError(f"kv_cache must be contiguous, strides {kv_cache.stride()}")
    if num_tokens == 0:
        return
    if latent.stride(-1) != 1:
        latent = latent.contiguous()
    _write_kv_kernel[(num_tokens,)](
        latent, kv_cache, slot_mapping, entry_dim, latent.stride(0), BE=triton.next_power_of_2(entry_dim)
    )


# NOTE: the block-table width changes with the longest sequence of a batch; specialising on it
# (is it 1, a multiple of 16?) would recompile the kernel on new batch shapes.
@triton.jit(do_not_specialize=["stride_bt", "splits"])
def _mla_attention_kernel(
    q_lat, q_pe, kv_cache, out, o_part, lse_part,
    seq_ids, cu_seqlens, seq_lens, block_tables,
    H, R, DR, sm_scale, splits,
    stride_qlt, stride_qlh, stride_qpt, stride_qph, stride_ot, stride_oh, stride_bt,
    BLOCK_SIZE: tl.constexpr, BH: tl.constexpr, BN: tl.constexpr, BR: tl.constexpr, BDR: tl.constexpr,
    IEEE: tl.constexpr, SPLIT: tl.constexpr,
):
    i_t = tl.program_id(0).to(tl.int64)
    i_hb = tl.program_id(1)
    i_s = tl.program_id(2)
    seq = tl.load(seq_ids + i_t).to(tl.int64)
    seq_len = tl.load(seq_lens + seq)
    end = tl.load(cu_seqlens + seq + 1)
    # This token's position; it sees keys 0..pos. Padded rows (seq_len 0) see none.
    num_keys = seq_len - (end - i_t) + 1
    o_h = i_hb * BH + tl.arange(0, BH)
    m_h = o_h < H
    o_r = tl.arange(0, BR)
    m_r = o_r < R
    o_p = tl.arange(0, BDR)
    m_p = o_p < DR
    b_ql = tl.load(q_lat + i_t * stride_qlt + o_h[:, None] * stride_qlh + o_r[None, :],
                   mask=m_h[:, None] & m_r[None, :], other=0.0)  # [BH, BR]
    b_qp = tl.load(q_pe + i_t * stride_qpt + o_h[:, None] * stride_qph + o_p[None, :],
                   mask=m_h[:, None] & m_p[None, :], other=0.0)  # [BH, BDR]
    E = R + DR
    # NOTE: exp2 with log2(e) folded into the scale.
    qk_scale = sm_scale * 1.4426950408889634
    m_i = tl.full([BH], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BH], dtype=tl.float32)
    acc = tl.zeros([BH, BR], dtype=tl.float32)
    table = block_tables + seq * stride_bt
    # This program's slice of the keys: whole BN blocks, the last slice shorter.
    per_split = tl.cdiv(tl.cdiv(num_keys, BN), splits) * BN
    k_lo = i_s * per_split
    k_hi = tl.minimum(num_keys, k_lo + per_split)
    for start in range(k_lo, k_hi, BN):
        o_n = start + tl.arange(0, BN)
        m_n = o_n < k_hi
        block = tl.load(table + o_n // BLOCK_SIZE, mask=m_n, other=0).to(tl.int64)
        row = (tl.maximum(block, 0) * BLOCK_SIZE + o_n % BLOCK_SIZE) * E  # [BN]
        b_c = tl.load(kv_cache + row[:, None] + o_r[None, :], mask=m_n[:, None] & m_r[None, :], other=0.0)
        b_p = tl.load(kv_cache + row[:, None] + R + o_p[None, :], mask=m_n[:, None] & m_p[None, :], other=0.0)
        if IEEE:
            s = tl.dot(b_ql, tl.trans(b_c), input_precision="ieee")
            s += tl.dot(b_qp, tl.trans(b_p), input_precision="ieee")
        else:
            s = tl.dot(b_ql, tl.trans(b_c))
            s += tl.dot(b_qp, tl.trans(b_p))
        s = tl.where(m_n[None, :], s * qk_scale, float("-inf"))  # [BH, BN]
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p, b_c.to(tl.float32), input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(b_c.dtype), b_c)
        m_i = m_new
    # Rows that saw no key (padding, an empty slice) get zeros, not 0/0.
    acc = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    if SPLIT:
        # [T, H, splits, R] partial outputs and their log2-sum-exp (-inf: no key in the slice).
        part = (i_t * H + o_h) * splits + i_s
        tl.store(o_part + part[:, None] * R + o_r[None, :], acc, mask=m_h[:, None] & m_r[None, :])
        tl.store(lse_part + part, tl.where(l_i > 0, m_i + tl.log2(l_i), float("-inf")), mask=m_h)
    else:
        tl.store(out + i_t * stride_ot + o_h[:, None] * stride_oh + o_r[None, :], acc.to(out.dtype.element_ty),
                 mask=m_h[:, None] & m_r[None, :])


@triton.jit(do_not_specialize=["splits"])
def _merge_splits_kernel(o_part, lse_part, out, H, R, splits, stride_ot, stride_oh,
                         BS: tl.constexpr, BR: tl.constexpr):
    i_t = tl.program_id(0).to(tl.int64)
    i_h = tl.program_id(1)
    row = i_t * H + i_h
    o_s = tl.arange(0, BS)
    m_s = o_s < splits
    lse = tl.load(lse_part + row * splits + o_s, mask=m_s, other=float("-inf"))
    top = tl.max(lse, 0)
    w = tl.where(lse > float("-inf"), tl.exp2(lse - tl.where(top > float("-inf"), top, 0.0)), 0.0)
    o_r = tl.arange(0, BR)
    m_r = o_r < R
    parts = tl.load(o_part + (row * splits + o_s)[:, None] * R + o_r[None, :], mask=m_s[:, None] & m_r[None, :],
                    other=0.0)
    total = tl.sum(w, 0)
    acc = tl.sum(parts * w[:, None], 0) / tl.where(total > 0, total, 1.0)
    tl.store(out + i_t * stride_ot + i_h * stride_oh + o_r, acc.to(out.dtype.element_ty), mask=m_r)


def _device_int32(x: torch.Tensor | Sequence[int], device: torch.device) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.to(device=device, dtype=torch.int32)
    return torch.tensor(list(x), dtype=torch.int32).to(device, non_blocking=True)


def token_seq_ids(
    cu_seqlens: torch.Tensor | Sequence[int], seq_lens: torch.Tensor | Sequence[int], num_tokens: int,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(cu_seqlens, seq_lens, seq_ids)`` int32 on ``device``; ``seq_ids [T]`` names each token's sequence.

    Host lists are copied to the device (no sync); device tensors are used as they are.
    """
    cu = _device_int32(cu_seqlens, device)
    lens = _device_int32(seq_lens, device)
    # NOTE: output_size keeps repeat_interleave from syncing to learn the total.
    seq_ids = torch.repeat_interleave(
        torch.arange(lens.shape[0], device=device, dtype=torch.int32), cu[1:] - cu[:-1], output_size=num_tokens
    )
    return cu, lens, seq_ids


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
    """See :func:`deltaserve.ops.attention.paged_mla_attention_ref`; returns ``[T, H, Dv]`` in q's dtype.

    Host lists for ``cu_seqlens`` / ``seq_lens`` are copied to the device (no sync); device tensors
    are used as they are, which is what CUDA-graph capture needs. Matrix products run in q's dtype
    with float32 accumulation (full float32 for float32 inputs).
    """
    num_tokens = q.shape[0]
    num_heads, nope_dim, rank = w_uk.shape
    rope_dim = q.shape[-1] - nope_dim
    if kv_cache.shape[-1] != rank + rope_dim:
        raise ValueError(f"kv_cache entry_dim {kv_cache.shape[-1]} != kv_lora_rank {rank} + rope dim {rope_dim}")
    if not kv_cache.is_contiguous():
        raise ValueError(f"kv_cache must be contiguous, strides {kv_cache.stride()}")
    if num_tokens == 0:
        return q.new_empty(0, num_heads, w_uv.shape[1])
    device = q.device
    cu, lens, seq_ids = token_seq_ids(cu_seqlens, seq_lens, num_tokens, device)
    q_nope, q_pe = q.split([nope_dim, rope_dim], dim=-1)
    # Absorb w_uk: [H, T, Dn] @ [H, Dn, R] -> [H, T, R], viewed [T, H, R].
    q_lat = torch.bmm(q_nope.transpose(0, 1), w_uk.to(q.dtype)).transpose(0, 1)
    o_lat = torch.empty(num_tokens, num_heads, rank, dtype=q.dtype, device=device)
    tables = block_tables.to(torch.int32)
    # NOTE: float32 keys take twice the shared memory per stage: the narrow tile only.
    block_h, block_n, warps, stages = mla_tile(num_tokens) if q.dtype != torch.float32 else NARROW_TILE
    head_blocks = triton.cdiv(num_heads, block_h)
    splits = num_splits(num_tokens, head_blocks)
    if splits > 1:
        o_part = torch.empty(num_tokens, num_heads, splits, rank, dtype=torch.float32, device=device)
        lse_part = torch.empty(num_tokens, num_heads, splits, dtype=torch.float32, device=device)
    else:
        o_part = lse_part = o_lat  # not written
    block_r = max(16, triton.next_power_of_2(rank))
    _mla_attention_kernel[(num_tokens, head_blocks, splits)](
        q_lat, q_pe, kv_cache, o_lat, o_part, lse_part,
        seq_ids, cu, lens, tables,
        num_heads, rank, rope_dim, scale, splits,
        q_lat.stride(0), q_lat.stride(1), q_pe.stride(0), q_pe.stride(1), o_lat.stride(0), o_lat.stride(1),
        tables.stride(0),
        BLOCK_SIZE=kv_cache.shape[1], BH=block_h, BN=block_n,
        BR=block_r, BDR=max(16, triton.next_power_of_2(rope_dim)),
        IEEE=q.dtype == torch.float32, SPLIT=splits > 1, num_warps=warps, num_stages=stages,
    )  # fmt: skip
    if splits > 1:
        _merge_splits_kernel[(num_tokens, num_heads)](
            o_part, lse_part, o_lat, num_heads, rank, splits, o_lat.stride(0), o_lat.stride(1),
            BS=max(2, triton.next_power_of_2(splits)), BR=block_r,
        )  # fmt: skip
    # Un-absorb w_uv: [H, T, R] @ [H, R, Dv] -> [H, T, Dv], viewed [T, H, Dv].
    return torch.bmm(o_lat.transpose(0, 1), w_uv.to(q.dtype).transpose(1, 2)).transpose(0, 1)
