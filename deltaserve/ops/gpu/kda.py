"""KDA on the GPU: fla-core's gate and chunked prefill, and a slot-indexed Triton decode kernel.

Same contract as :mod:`deltaserve.ops.kda`. The pool stores each head's state ``(Dv, Dk)``
(``[num_slots+1, H, V, K]`` float32), which is fla's ``state_v_first=True`` layout, so no transpose
is ever materialised.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from fla.ops.kda import chunk_kda as fla_chunk_kda
from fla.ops.kda.fused_recurrent import fused_recurrent_kda_fwd as fla_fused_recurrent_kda_fwd
from fla.ops.kda.gate import kda_gate_fwd as fla_kda_gate_fwd

from deltaserve.ops.kda import L2NORM_EPS, check_gate_shapes


def _check_state(recurrent_state: torch.Tensor, heads: int, k_dim: int, v_dim: int, op: str) -> None:
    if recurrent_state.dtype != torch.float32:
        raise ValueError(f"{op}: recurrent_state must be float32, got {recurrent_state.dtype}")
    if recurrent_state.dim() != 4 or tuple(recurrent_state.shape[1:]) != (heads, v_dim, k_dim):
        raise ValueError(
            f"{op}: recurrent_state must be [num_slots+1, H={heads}, V={v_dim}, K={k_dim}], "
            f"got {tuple(recurrent_state.shape)}"
        )
    if not recurrent_state[0].is_contiguous():
        raise ValueError(f"{op}: each slot of recurrent_state must be contiguous, strides {recurrent_state.stride()}")


def kda_gate(f: torch.Tensor, A_log: torch.Tensor, dt_bias: torch.Tensor) -> torch.Tensor:
    """``g [T, H, K]`` float32 ``= -exp(A_log) * softplus(f + dt_bias)`` through fla's fused gate kernel."""
    heads = check_gate_shapes(f, A_log, dt_bias)
    gate = f.reshape(*f.shape[:-1], heads, f.shape[-1] // heads).contiguous()
    return fla_kda_gate_fwd(gate, A_log.reshape(heads).contiguous(), dt_bias.reshape(-1).contiguous(),
                            output_dtype=torch.float32)


_cu_cache: list = [None, None]  # [the caller's cu_seqlens, its int64 copy]


def _long_cu_seqlens(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """``cu_seqlens`` as int64, the same tensor object for the same input object.

    NOTE: fla caches chunk indices on the identity of the cu_seqlens tensor it gets (and building
    them syncs with the host); all KDA layers of one forward share the runner's cu_seqlens, so
    converting it once keeps fla's cache hit for every layer after the first. Like fla's cache,
    this assumes a cu_seqlens tensor is not rewritten in place between calls.
    """
    if cu_seqlens.dtype == torch.long:
        return cu_seqlens
    if _cu_cache[0] is not cu_seqlens:
        _cu_cache[0], _cu_cache[1] = cu_seqlens, cu_seqlens.to(torch.long)
    return _cu_cache[1]


def chunk_kda(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    recurrent_state: torch.Tensor,
    cu_seqlens: torch.Tensor,
    state_indices: torch.Tensor,
    has_initial_state: torch.Tensor,
    *,
    scale: float | None = None,
    use_qk_l2norm_in_kernel: bool = True,
    chunk_size: int = 64,
) -> torch.Tensor:
    """Varlen chunked KDA through fla's ``chunk_kda``: initial states gathered from the slots (zeros where
    ``has_initial_state`` is False), final states scattered back. Returns ``o [T, H, V]`` in ``q.dtype``."""
    heads, k_dim, v_dim = q.shape[1], q.shape[2], v.shape[2]
    _check_state(recurrent_state, heads, k_dim, v_dim, "chunk_kda")
    num_seqs = state_indices.shape[0]
    if q.shape[0] == 0 or num_seqs == 0:
        return torch.empty(v.shape, dtype=q.dtype, device=q.device)
    index = state_indices.to(torch.long)
    initial = recurrent_state.index_select(0, index)  # [N, H, V, K]
    # NOTE: masked_fill, not a multiply: a fresh slot may hold anything, NaN included.
    initial.masked_fill_(~has_initial_state.to(torch.bool).view(-1, 1, 1, 1), 0.0)
    # NOTE: no_grad, not inference_mode: inference tensors returned to the caller would refuse in-place ops.
    with torch.no_grad():
        out, final = fla_chunk_kda(
            q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), g.unsqueeze(0).float(), beta.unsqueeze(0),
            scale=scale,
            initial_state=initial,
            output_final_state=True,
            use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel,
            state_v_first=True,
            cu_seqlens=_long_cu_seqlens(cu_seqlens),
            chunk_size=chunk_size,
        )
    recurrent_state.index_copy_(0, index, final)
    return out.squeeze(0)


@triton.jit
def _kda_decode_kernel(
    q, k, v, g, beta, o, state, state_indices,
    scale,
    stride_qb, stride_qh, stride_kb, stride_kh, stride_vb, stride_vh,
    stride_gb, stride_gh, stride_bb, stride_bh, stride_ob, stride_oh,
    stride_ss, stride_sh, stride_sv,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BV: tl.constexpr,
    L2NORM: tl.constexpr, EPS: tl.constexpr,
):
    # One program: one (sequence, head) and BV rows of its (V, K) state; the v-block varies
    # fastest so consecutive programs stream one contiguous 64 KiB head state.
    NV: tl.constexpr = V // BV
    pid = tl.program_id(0).to(tl.int64)
    i_v = pid % NV
    i_bh = pid // NV
    i_b = i_bh // H
    i_h = i_bh % H
    slot = tl.load(state_indices + i_b).to(tl.int64)
    o_k = tl.arange(0, K)
    o_v = i_v * BV + tl.arange(0, BV)
    p_h = state + slot * stride_ss + i_h * stride_sh + o_v[:, None] * stride_sv + o_k[None, :]
    b_h = tl.load(p_h)  # [BV, K] float32
    b_q = tl.load(q + i_b * stride_qb + i_h * stride_qh + o_k).to(tl.float32)
    b_k = tl.load(k + i_b * stride_kb + i_h * stride_kh + o_k).to(tl.float32)
    b_g = tl.load(g + i_b * stride_gb + i_h * stride_gh + o_k).to(tl.float32)
    b_v = tl.load(v + i_b * stride_vb + i_h * stride_vh + o_v).to(tl.float32)
    b_beta = tl.load(beta + i_b * stride_bb + i_h * stride_bh).to(tl.float32)
    if L2NORM:
        b_q = b_q / tl.sqrt(tl.sum(b_q * b_q) + EPS)
        b_k = b_k / tl.sqrt(tl.sum(b_k * b_k) + EPS)
    b_q = b_q * scale
    b_h = b_h * tl.exp(b_g)[None, :]
    b_v = (b_v - tl.sum(b_h * b_k[None, :], 1)) * b_beta
    b_h = b_h + b_v[:, None] * b_k[None, :]
    b_o = tl.sum(b_h * b_q[None, :], 1)
    tl.store(p_h, b_h)
    tl.store(o + i_b * stride_ob + i_h * stride_oh + o_v, b_o.to(o.dtype.element_ty))


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    # The kernel reads the last dim with unit stride; anything else (rare) is copied.
    return x if x.stride(-1) == 1 else x.contiguous()


def fused_recurrent_kda(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    recurrent_state: torch.Tensor,
    state_indices: torch.Tensor,
    *,
    scale: float | None = None,
    use_qk_l2norm_in_kernel: bool = True,
    block_v: int = 32,
    num_warps: int = 8,
) -> torch.Tensor:
    """Decode step (one token per sequence), one launch, in place on the slots.

    ``q, k, g [B, H, K]``, ``v [B, H, V]``, ``beta [B, H]``, any batch/head strides (views of a
    fused projection are read where they lie); returns ``o [B, H, V]`` in ``q.dtype``.
    NOTE: BV = 32 rows at 8 warps measured best on an H200 at batch 1..256 (benchmarks/RESULTS.md).
    """
    batch, heads, k_dim = q.shape
    v_dim = v.shape[-1]
    block_v = min(block_v, v_dim)  # small test models
    _check_state(recurrent_state, heads, k_dim, v_dim, "fused_recurrent_kda")
    if state_indices.shape[0] != batch:
        raise ValueError(f"fused_recurrent_kda: state_indices must have B={batch} entries, got {state_indices.shape[0]}")
    if k_dim & (k_dim - 1) or v_dim % block_v or block_v & (block_v - 1):
        raise ValueError(f"fused_recurrent_kda: K={k_dim} must be a power of two and V={v_dim} a multiple of {block_v}")
    q, k, v, g = (_last_dim_contiguous(t) for t in (q, k, v, g))
    out = torch.empty((batch, heads, v_dim), dtype=q.dtype, device=q.device)
    if batch == 0:
        return out
    scale = k_dim**-0.5 if scale is None else scale
    grid = (batch * heads * (v_dim // block_v),)
    _kda_decode_kernel[grid](
        q, k, v, g, beta, out, recurrent_state, state_indices,
        scale,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        g.stride(0), g.stride(1), beta.stride(0), beta.stride(1), out.stride(0), out.stride(1),
        recurrent_state.stride(0), recurrent_state.stride(1), recurrent_state.stride(2),
        H=heads, K=k_dim, V=v_dim, BV=block_v,
        L2NORM=use_qk_l2norm_in_kernel, EPS=L2NORM_EPS, num_warps=num_warps,
    )
    return out


def fused_recurrent_kda_fla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    recurrent_state: torch.Tensor,
    state_indices: torch.Tensor,
    *,
    scale: float | None = None,
    use_qk_l2norm_in_kernel: bool = True,
) -> torch.Tensor:
    """The same decode step through fla's ``fused_recurrent_kda_fwd`` (slot-indexed, in place, V-first).

    Kept as the baseline for the benchmarks and tests; it needs contiguous inputs.
    """
    batch, heads, k_dim = q.shape
    _check_state(recurrent_state, heads, k_dim, v.shape[-1], "fused_recurrent_kda_fla")
    q, k, v, g, beta = (t.contiguous().unsqueeze(1) for t in (q, k, v, g, beta))  # [B, 1, H, *]
    out, _ = fla_fused_recurrent_kda_fwd(
        q, k, v, g.float(), beta,
        initial_state=recurrent_state,
        scale=scale,
        inplace_final_state=True,
        state_v_first=True,
        ssm_state_indices=state_indices,
        use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel,
    )
    return out.squeeze(1)
