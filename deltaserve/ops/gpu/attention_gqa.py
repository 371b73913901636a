"""Paged grouped-query attention on the GPU: one Triton kernel over the per-head K/V cache.

Same contract as :func:`deltaserve.ops.attention.paged_gqa_attention_ref`. A program is one new
token and one KV head with its group of query heads (``H / Hkv`` rows, padded to 16 for ``tl.dot``);
it walks that token's causal key range through the block table with an online softmax, so each
key and value is loaded once per group. One kernel serves decode and (chunked) prefill. Sequence
lengths are read on the device: no host sync, CUDA-graph safe when ``seq_lens`` and ``cu_seqlens``
are device tensors; a padded row (sequence length 0) reads no key and writes zeros.
"""

from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

from deltaserve.ops.gpu.attention import token_seq_ids

# Query rows per program: tl.dot needs at least 16; a smaller group is masked.
MIN_BLOCK_H = 16
# Keys per inner iteration.
BLOCK_N = 32


@triton.jit
def _gqa_attention_kernel(
    q, kv_cache, out,
    seq_ids, cu_seqlens, seq_lens, block_tables,
    G, D, KVH, sm_scale,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_bt,
    BLOCK_SIZE: tl.constexpr, BH: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, IEEE: tl.constexpr,
):
    i_t = tl.program_id(0).to(tl.int64)
    i_kvh = tl.program_id(1)
    seq = tl.load(seq_ids + i_t).to(tl.int64)
    seq_len = tl.load(seq_lens + seq)
    end = tl.load(cu_seqlens + seq + 1)
    # This token's position; it sees keys 0..pos. Padded rows (seq_len 0) see none.
    num_keys = seq_len - (end - i_t) + 1
    o_g = tl.arange(0, BH)
    m_g = o_g < G
    o_h = i_kvh * G + o_g
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    b_q = tl.load(q + i_t * stride_qt + o_h[:, None] * stride_qh + o_d[None, :],
                  mask=m_g[:, None] & m_d[None, :], other=0.0)  # [BH, BD]
    E = 2 * KVH * D
    k_off = i_kvh * D
    v_off = KVH * D + i_kvh * D
    # NOTE: exp2 with log2(e) folded into the scale.
    qk_scale = sm_scale * 1.4426950408889634
    m_i = tl.full([BH], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BH], dtype=tl.float32)
    acc = tl.zeros([BH, BD], dtype=tl.float32)
    table = block_tables + seq * stride_bt
    for start in range(0, num_keys, BN):
        o_n = start + tl.arange(0, BN)
        m_n = o_n < num_keys
        block = tl.load(table + o_n // BLOCK_SIZE, mask=m_n, other=0).to(tl.int64)
        row = (tl.maximum(block, 0) * BLOCK_SIZE + o_n % BLOCK_SIZE) * E  # [BN]
        m_nd = m_n[:, None] & m_d[None, :]
        b_k = tl.load(kv_cache + row[:, None] + k_off + o_d[None, :], mask=m_nd, other=0.0)  # [BN, BD]
        b_v = tl.load(kv_cache + row[:, None] + v_off + o_d[None, :], mask=m_nd, other=0.0)
        if IEEE:
            s = tl.dot(b_q, tl.trans(b_k), input_precision="ieee")
        else:
            s = tl.dot(b_q, tl.trans(b_k))
        s = tl.where(m_n[None, :], s * qk_scale, float("-inf"))  # [BH, BN]
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p, b_v.to(tl.float32), input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(b_v.dtype), b_v)
        m_i = m_new
    # Rows that saw no key (padding) get zeros, not 0/0.
    acc = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(out + i_t * stride_ot + o_h[:, None] * stride_oh + o_d[None, :], acc.to(out.dtype.element_ty),
             mask=m_g[:, None] & m_d[None, :])


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
    """See :func:`deltaserve.ops.attention.paged_gqa_attention_ref`; returns ``[T, H, D]`` in q's dtype.

    Host lists for ``cu_seqlens`` / ``seq_lens`` are copied to the device (no sync); device tensors are
    used as they are. Products run in q's dtype with float32 accumulation (full float32 for float32).
    """
    num_tokens, num_heads, head_dim = q.shape
    if num_heads % num_kv_heads != 0:
        raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
    if kv_cache.shape[-1] != 2 * num_kv_heads * head_dim:
        raise ValueError(f"kv_cache entry_dim {kv_cache.shape[-1]} != 2 x {num_kv_heads} KV heads x {head_dim}")
    if not kv_cache.is_contiguous():
        raise ValueError(f"kv_cache must be contiguous, strides {kv_cache.stride()}")
    out = torch.empty(num_tokens, num_heads, head_dim, dtype=q.dtype, device=q.device)
    if num_tokens == 0:
        return out
    if q.stride(-1) != 1:
        q = q.contiguous()
    cu, lens, seq_ids = token_seq_ids(cu_seqlens, seq_lens, num_tokens, q.device)
    tables = block_tables.to(torch.int32)
    group = num_heads // num_kv_heads
    block_d = max(16, triton.next_power_of_2(head_dim))
    _gqa_attention_kernel[(num_tokens, num_kv_heads)](
        q, kv_cache, out,
        seq_ids, cu, lens, tables,
        group, head_dim, num_kv_heads, scale,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), tables.stride(0),
        BLOCK_SIZE=kv_cache.shape[1], BH=max(MIN_BLOCK_H, triton.next_power_of_2(group)), BN=BLOCK_N, BD=block_d,
        IEEE=q.dtype == torch.float32, num_warps=4 if block_d <= 128 else 8, num_stages=2,
    )  # fmt: skip
    return out
