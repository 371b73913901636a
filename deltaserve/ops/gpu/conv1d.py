"""Triton causal depthwise conv1d over a flat varlen batch, slot-indexed conv states (GPU path).

Same contract as :mod:`deltaserve.ops.conv1d`: ``conv_state`` is a ``[num_slots+1, L, D]`` SD view
of the pool (a DS pool passes ``.transpose(-1, -2)``, so every state access goes through strides),
``L >= K - 1``, and a slot keeps the last ``L`` conv inputs, newest last.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from deltaserve.ops.conv1d import _check_state

_ACTIVATIONS = {None: False, "silu": True, "swish": True}


def _silu_flag(activation: str | None) -> bool:
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be 'silu', 'swish' or None, got {activation!r}")
    return _ACTIVATIONS[activation]


# NOTE: T (tokens of the batch) changes every step: no specialisation on it, no recompiles.
@triton.jit(do_not_specialize=["T"])
def _conv1d_varlen_fwd_kernel(
    x, w, out, state, cu_seqlens, seq_ids, state_indices, has_initial_state,
    T, D,
    stride_xt, stride_xd, stride_wd, stride_wk, stride_ot,
    stride_ss, stride_sl, stride_sd,
    K: tl.constexpr, L: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr, SILU: tl.constexpr,
):
    # One program: BT flat tokens x BD channels. Tokens look up their sequence, so one launch
    # serves any mix of lengths; taps before a sequence's start read its slot's last K-1 rows.
    i_t, i_d = tl.program_id(0), tl.program_id(1)
    o_t = i_t * BT + tl.arange(0, BT)
    o_d = i_d * BD + tl.arange(0, BD)
    m_t = o_t < T
    m_d = o_d < D
    seq = tl.load(seq_ids + o_t, mask=m_t, other=0)
    pos = o_t - tl.load(cu_seqlens + seq, mask=m_t, other=0)  # position within its sequence
    p_x = x + o_t.to(tl.int64)[:, None] * stride_xt + o_d[None, :] * stride_xd
    m = m_t[:, None] & m_d[None, :]
    b_w = tl.load(w + o_d * stride_wd + (K - 1) * stride_wk, mask=m_d, other=0.0).to(tl.float32)
    acc = tl.load(p_x, mask=m, other=0.0).to(tl.float32) * b_w[None, :]
    # NOTE: only tiles holding one of a sequence's first K-1 tokens read the state; the others
    # (almost all of a long prefill) take the plain shifted loads.
    near_start = tl.min(tl.where(m_t, pos, K)) < K - 1
    for j in tl.static_range(K - 1):
        shift = K - 1 - j
        p = pos - shift
        b_w = tl.load(w + o_d * stride_wd + j * stride_wk, mask=m_d, other=0.0).to(tl.float32)
        b_x = tl.load(p_x - shift * stride_xt, mask=m & (p >= 0)[:, None], other=0.0).to(tl.float32)
        if near_start:
            # p in [-(K-1), -1] -> state row L + p (values defined inside a runtime branch stay there)
            slot = tl.load(state_indices + seq, mask=m_t, other=0).to(tl.int64)
            init = tl.load(has_initial_state + seq, mask=m_t, other=0) != 0
            row = tl.where(p >= 0, 0, L + p).to(tl.int64)
            m_s = m & ((p < 0) & init)[:, None]
            p_s = state + slot[:, None] * stride_ss + row[:, None] * stride_sl + o_d[None, :] * stride_sd
            b_x += tl.load(p_s, mask=m_s, other=0.0).to(tl.float32)
        acc += b_x * b_w[None, :]
    if SILU:
        acc = acc * tl.sigmoid(acc)
    tl.store(out + o_t.to(tl.int64)[:, None] * stride_ot + o_d[None, :], acc.to(out.dtype.element_ty), mask=m)


@triton.jit
def _conv1d_varlen_final_state_kernel(
    x, state, cu_seqlens, state_indices, has_initial_state,
    D,
    stride_xt, stride_xd, stride_ss, stride_sl, stride_sd,
    L: tl.constexpr, BD: tl.constexpr,
):
    # Runs after the output kernel, which reads the old windows. New row r holds the input at
    # position p = n - L + r: from x when p >= 0, else old row L + p = n + r (> r), which this
    # same thread overwrites only at a later r, so ascending r never reads a row already written.
    i_b, i_d = tl.program_id(0), tl.program_id(1)
    bos = tl.load(cu_seqlens + i_b)
    n = tl.load(cu_seqlens + i_b + 1) - bos
    if n > 0:
        slot = tl.load(state_indices + i_b).to(tl.int64)
        init = tl.load(has_initial_state + i_b) != 0
        o_d = i_d * BD + tl.arange(0, BD)
        m_d = o_d < D
        base = state + slot * stride_ss + o_d * stride_sd
        for r in tl.static_range(L):
            p = n - L + r
            b_x = tl.load(x + (bos + tl.maximum(p, 0)).to(tl.int64) * stride_xt + o_d * stride_xd,
                          mask=m_d & (p >= 0), other=0.0)
            b_s = tl.load(base + (L + tl.minimum(p, -1)).to(tl.int64) * stride_sl,
                          mask=m_d & (p < 0) & init, other=0.0)
            b_r = tl.where(p >= 0, b_x.to(tl.float32), b_s.to(tl.float32))
            tl.store(base + r * stride_sl, b_r.to(state.dtype.element_ty), mask=m_d)


@triton.jit
def _conv1d_update_kernel(
    x, w, out, state, state_indices,
    D,
    stride_xb, stride_xd, stride_wd, stride_wk, stride_ob,
    stride_ss, stride_sl, stride_sd,
    K: tl.constexpr, L: tl.constexpr, BD: tl.constexpr, SILU: tl.constexpr,
):
    i_b, i_d = tl.program_id(0), tl.program_id(1)
    o_d = i_d * BD + tl.arange(0, BD)
    m_d = o_d < D
    slot = tl.load(state_indices + i_b).to(tl.int64)
    base = state + slot * stride_ss + o_d * stride_sd
    b_x = tl.load(x + i_b.to(tl.int64) * stride_xb + o_d * stride_xd, mask=m_d, other=0.0)
    # The window is the last K of [old rows 0..L-1, x]; tap j reads old row L + 1 - K + j.
    acc = b_x.to(tl.float32) * tl.load(w + o_d * stride_wd + (K - 1) * stride_wk, mask=m_d, other=0.0).to(tl.float32)
    for j in tl.static_range(K - 1):
        b_w = tl.load(w + o_d * stride_wd + j * stride_wk, mask=m_d, other=0.0).to(tl.float32)
        b_s = tl.load(base + (L + 1 - K + j) * stride_sl, mask=m_d, other=0.0).to(tl.float32)
        acc += b_s * b_w
    # Shift by one, ascending: row r takes old row r + 1 before row r + 1 is overwritten
    # (each channel lives in one thread, BD is a multiple of the thread count).
    for r in tl.static_range(L - 1):
        tl.store(base + r * stride_sl, tl.load(base + (r + 1) * stride_sl, mask=m_d, other=0.0), mask=m_d)
    tl.store(base + (L - 1) * stride_sl, b_x.to(state.dtype.element_ty), mask=m_d)
    if SILU:
        acc = acc * tl.sigmoid(acc)
    tl.store(out + i_b.to(tl.int64) * stride_ob + o_d, acc.to(out.dtype.element_ty), mask=m_d)


def causal_conv1d_fn(
    x: torch.Tensor,
    weight: torch.Tensor,
    conv_state: torch.Tensor,
    cu_seqlens: torch.Tensor,
    state_indices: torch.Tensor,
    has_initial_state: torch.Tensor,
    activation: str | None = "silu",
    *,
    block_t: int = 16,
    block_d: int = 128,
    num_warps: int = 4,
) -> torch.Tensor:
    """Varlen prefill conv (see :func:`deltaserve.ops.conv1d.causal_conv1d_fn`); two launches, no host sync."""
    silu = _silu_flag(activation)
    num_tokens, dim = x.shape
    kernel = weight.shape[-1]
    _check_state(weight, conv_state, dim)
    state_len = conv_state.shape[1]
    out = torch.empty((num_tokens, dim), dtype=x.dtype, device=x.device)
    num_seqs = state_indices.shape[0]
    if num_tokens == 0 or num_seqs == 0:
        return out
    cu_seqlens = cu_seqlens.to(torch.int32)
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    # NOTE: output_size avoids a device->host sync; seq_ids[t] = the sequence of flat token t.
    seq_ids = torch.repeat_interleave(
        torch.arange(num_seqs, device=x.device, dtype=torch.int32), lengths, output_size=num_tokens
    )
    init = has_initial_state.to(torch.int8)
    indices = state_indices.to(torch.int32)
    _conv1d_varlen_fwd_kernel[(triton.cdiv(num_tokens, block_t), triton.cdiv(dim, block_d))](
        x, weight, out, conv_state, cu_seqlens, seq_ids, indices, init,
        num_tokens, dim,
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), out.stride(0),
        conv_state.stride(0), conv_state.stride(1), conv_state.stride(2),
        K=kernel, L=state_len, BT=block_t, BD=block_d, SILU=silu, num_warps=num_warps,
    )
    _conv1d_varlen_final_state_kernel[(num_seqs, triton.cdiv(dim, 256))](
        x, conv_state, cu_seqlens, indices, init,
        dim,
        x.stride(0), x.stride(1), conv_state.stride(0), conv_state.stride(1), conv_state.stride(2),
        L=state_len, BD=256, num_warps=2,
    )
    return out


def causal_conv1d_update(
    x: torch.Tensor,
    weight: torch.Tensor,
    conv_state: torch.Tensor,
    state_indices: torch.Tensor,
    activation: str | None = "silu",
    *,
    block_d: int = 256,
    num_warps: int = 2,
) -> torch.Tensor:
    """Decode conv: ``x [B, D]``, one token per sequence; shifts each slot's window in place, one launch."""
    silu = _silu_flag(activation)
    batch, dim = x.shape
    _check_state(weight, conv_state, dim)
    if state_indices.shape[0] != batch:
        raise ValueError(f"state_indices must have B={batch} entries, got {state_indices.shape[0]}")
    out = torch.empty((batch, dim), dtype=x.dtype, device=x.device)
    if batch == 0:
        return out
    _conv1d_update_kernel[(batch, triton.cdiv(dim, block_d))](
        x, weight, out, conv_state, state_indices,
        dim,
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), out.stride(0),
        conv_state.stride(0), conv_state.stride(1), conv_state.stride(2),
        K=weight.shape[-1], L=conv_state.shape[1], BD=block_d, SILU=silu, num_warps=num_warps,
    )
    return out
