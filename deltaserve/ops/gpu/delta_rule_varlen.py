"""GPU twin of :mod:`deltaserve.ops.delta_rule_varlen`: the decode kernel's program with a loop over
the sequence's tokens, the state tile kept in registers, and the final store optional."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from deltaserve.ops.delta_rule import L2NORM_EPS, check_shapes

# NOTE: the checks shared with ``gpu/delta_rule.py`` live here, as this module needs no fla.
STATE_DTYPES = (torch.float32, torch.bfloat16)


def _check_state(recurrent_state: torch.Tensor, op: str) -> None:
    if recurrent_state.dtype not in STATE_DTYPES:
        raise ValueError(f"{op}: recurrent_state must be float32 or bfloat16, got {recurrent_state.dtype}")
    if not recurrent_state[0].is_contiguous():
        raise ValueError(f"{op}: each slot of recurrent_state must be contiguous, strides {recurrent_state.stride()}")


def _check_blocks(k_dim: int, v_dim: int, block_v: int, op: str) -> None:
    if k_dim & (k_dim - 1) or v_dim % block_v or block_v & (block_v - 1):
        raise ValueError(f"{op}: K={k_dim} must be a power of two and V={v_dim} a multiple of {block_v}")


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    # The kernel reads the last dim with unit stride; anything else (rare) is copied.
    return x if x.stride(-1) == 1 else x.contiguous()


@triton.jit
def _delta_rule_varlen_kernel(
    q, k, v, g, beta, o, state, cu_seqlens, state_indices,
    scale,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_gt, stride_gh, stride_bt, stride_bh, stride_ot, stride_oh,
    stride_ss, stride_sh, stride_sv,
    HV: tl.constexpr, GROUP: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BV: tl.constexpr,
    HEAD_GATE: tl.constexpr, L2NORM: tl.constexpr, EPS: tl.constexpr, STORE: tl.constexpr,
):
    # One program: one (sequence, value head) and BV rows of its (V, K) state, as the decode kernel;
    # it walks the sequence's tokens with the tile in registers. Value head i_hv reads q/k head
    # i_hv // GROUP (GVA, repeat_interleave order).
    NV: tl.constexpr = V // BV
    pid = tl.program_id(0).to(tl.int64)
    i_v = pid % NV
    i_bh = pid // NV
    i_b = i_bh // HV
    i_hv = i_bh % HV
    i_hk = i_hv // GROUP
    o_k = tl.arange(0, K)
    o_v = i_v * BV + tl.arange(0, BV)
    bos = tl.load(cu_seqlens + i_b).to(tl.int64)
    eos = tl.load(cu_seqlens + i_b + 1).to(tl.int64)
    slot = tl.load(state_indices + i_b).to(tl.int64)
    p_h = state + slot * stride_ss + i_hv * stride_sh + o_v[:, None] * stride_sv + o_k[None, :]
    b_h = tl.load(p_h).to(tl.float32)  # [BV, K]
    for t in range(bos, eos):
        b_q = tl.load(q + t * stride_qt + i_hk * stride_qh + o_k).to(tl.float32)
        b_k = tl.load(k + t * stride_kt + i_hk * stride_kh + o_k).to(tl.float32)
        b_v = tl.load(v + t * stride_vt + i_hv * stride_vh + o_v).to(tl.float32)
        b_beta = tl.load(beta + t * stride_bt + i_hv * stride_bh).to(tl.float32)
        if HEAD_GATE:
            b_decay = tl.exp(tl.load(g + t * stride_gt + i_hv * stride_gh).to(tl.float32))
        else:
            b_decay = tl.exp(tl.load(g + t * stride_gt + i_hv * stride_gh + o_k).to(tl.float32))[None, :]
        if L2NORM:
            b_q = b_q / tl.sqrt(tl.sum(b_q * b_q) + EPS)
            b_k = b_k / tl.sqrt(tl.sum(b_k * b_k) + EPS)
        b_q = b_q * scale
        b_h = b_h * b_decay
        b_v = (b_v - tl.sum(b_h * b_k[None, :], 1)) * b_beta
        b_h = b_h + b_v[:, None] * b_k[None, :]
        b_o = tl.sum(b_h * b_q[None, :], 1)
        tl.store(o + t * stride_ot + i_hv * stride_oh + o_v, b_o.to(o.dtype.element_ty))
    if STORE:
        tl.store(p_h, b_h.to(state.dtype.element_ty))


def recurrent_delta_rule_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    recurrent_state: torch.Tensor,
    cu_seqlens: torch.Tensor,
    state_indices: torch.Tensor,
    *,
    store_final_state: bool = True,
    scale: float | None = None,
    use_qk_l2norm_in_kernel: bool = True,
    block_v: int = 32,
    num_warps: int = 4,
) -> torch.Tensor:
    """One launch for all sequences and heads; see :func:`deltaserve.ops.delta_rule_varlen.recurrent_delta_rule_varlen`."""
    shape = check_shapes(q, k, v, g, beta, recurrent_state, "recurrent_delta_rule_varlen")
    _check_state(recurrent_state, "recurrent_delta_rule_varlen")
    k_dim, v_dim = shape.k_dim, shape.v_dim
    block_v = min(block_v, v_dim)
    _check_blocks(k_dim, v_dim, block_v, "recurrent_delta_rule_varlen")
    q, k, v, g = (_last_dim_contiguous(t) for t in (q, k, v, g))
    out = torch.empty((q.shape[0], shape.num_v_heads, v_dim), dtype=q.dtype, device=q.device)
    num_seqs = state_indices.shape[0]
    if num_seqs == 0 or q.shape[0] == 0:
        return out
    scale = k_dim**-0.5 if scale is None else scale
    grid = (num_seqs * shape.num_v_heads * (v_dim // block_v),)
    _delta_rule_varlen_kernel[grid](
        q, k, v, g, beta, out, recurrent_state, cu_seqlens, state_indices,
        scale,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        g.stride(0), g.stride(1), beta.stride(0), beta.stride(1), out.stride(0), out.stride(1),
        recurrent_state.stride(0), recurrent_state.stride(1), recurrent_state.stride(2),
        HV=shape.num_v_heads, GROUP=shape.num_v_heads // shape.num_k_heads, K=k_dim, V=v_dim, BV=block_v,
        HEAD_GATE=shape.head_gate, L2NORM=use_qk_l2norm_in_kernel, EPS=L2NORM_EPS, STORE=store_final_state,
        num_warps=num_warps,
    )  # fmt: skip
    return out
