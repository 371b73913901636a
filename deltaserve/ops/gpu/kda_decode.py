"""One fused Triton kernel for a KDA layer's whole decode step (everything between the projections).

``kda_decode_step`` = causal conv update (q|k|v) -> SiLU -> l2norm(q, k) -> forget gate -> delta rule on the
slot's recurrent state -> sigmoid-gated RMSNorm, in one launch: the same function as composing
:func:`deltaserve.ops.conv1d.causal_conv1d_update`, :func:`deltaserve.ops.kda.kda_gate`,
:func:`deltaserve.ops.delta_rule.fused_recurrent_delta_rule` and :func:`deltaserve.ops.norm.gated_rms_norm`, without
their intermediate tensors and launch gaps. The step is memory bound on the recurrent state (2 MiB per
request per layer at Kimi-Linear-48B dims), which this kernel streams once.

GPU only, no torch twin: the tests compare it with the composed torch references.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from deltaserve.ops.delta_rule import L2NORM_EPS


@triton.jit
def _conv_window(p_x, w, p_cs, c, stride_xd, stride_wd, stride_wk, stride_cl, stride_cd,
                 L: tl.constexpr, LP: tl.constexpr, KC: tl.constexpr):
    """Conv of channels ``c`` of one slot: returns (SiLU(conv) fp32 [N], extended window [LP, N]).

    Row r of the extended window is old row r (r < L) or x (r = L); the conv taps are its last KC
    rows and the new state is its rows 1..L. The caller stores it after a barrier (other threads
    may still read old rows).
    """
    o_r = tl.arange(0, LP)
    b_x = tl.load(p_x + c * stride_xd).to(tl.float32)  # [N]
    m_old = (o_r < L)[:, None] & (c[None, :] >= 0)
    b_s = tl.load(p_cs + o_r[:, None] * stride_cl + c[None, :] * stride_cd, mask=m_old, other=0.0)
    b_s = tl.where((o_r == L)[:, None], b_x[None, :], b_s.to(tl.float32))  # [LP, N]
    tap = o_r - (L + 1 - KC)
    m_w = ((tap >= 0) & (o_r <= L))[:, None] & (c[None, :] >= 0)
    b_w = tl.load(w + c[None, :] * stride_wd + tl.maximum(tap, 0)[:, None] * stride_wk, mask=m_w, other=0.0)
    acc = tl.sum(b_s * b_w.to(tl.float32), axis=0)
    return acc * tl.sigmoid(acc), b_s


@triton.jit
def _kda_decode_step_kernel(
    proj, conv_w, conv_state, f, beta, gate, norm_w, A_log, dt_bias, out, state, state_indices,
    scale, norm_eps,
    stride_xb, stride_xd, stride_wd, stride_wk, stride_cs, stride_cl, stride_cd,
    stride_fb, stride_bb, stride_bh, stride_zb, stride_ob, stride_oh,
    stride_ss, stride_sh, stride_sv,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BV: tl.constexpr,
    L: tl.constexpr, LP: tl.constexpr, KC: tl.constexpr, EPS: tl.constexpr, L2NORM: tl.constexpr,
):
    # One program per (sequence, head): it owns that head's conv channels (so the in-place window
    # shift races with nobody) and streams the head's (V, K) state in BV-row tiles, prefetching the
    # next tile while it computes the current one.
    i_bh = tl.program_id(0).to(tl.int64)
    i_b = i_bh // H
    i_h = i_bh % H
    slot = tl.load(state_indices + i_b).to(tl.int64)
    o_k = tl.arange(0, K)
    o_va = tl.arange(0, V)
    o_bv = tl.arange(0, BV)
    p_h = state + slot * stride_ss + i_h * stride_sh
    b_h = tl.load(p_h + o_bv[:, None] * stride_sv + o_k[None, :])  # first tile in flight early

    p_x = proj + i_b * stride_xb
    p_cs = conv_state + slot * stride_cs
    c_q, c_k, c_v = i_h * K + o_k, H * K + i_h * K + o_k, 2 * H * K + i_h * V + o_va
    b_q, s_q = _conv_window(p_x, conv_w, p_cs, c_q, stride_xd, stride_wd, stride_wk, stride_cl, stride_cd, L, LP, KC)
    b_k, s_k = _conv_window(p_x, conv_w, p_cs, c_k, stride_xd, stride_wd, stride_wk, stride_cl, stride_cd, L, LP, KC)
    b_v, s_v = _conv_window(p_x, conv_w, p_cs, c_v, stride_xd, stride_wd, stride_wk, stride_cl, stride_cd, L, LP, KC)
    tl.debug_barrier()
    # new row r = extended row r + 1
    o_r = tl.arange(0, LP)
    m_r = ((o_r >= 1) & (o_r <= L))[:, None]
    p_r = p_cs + (tl.maximum(o_r, 1) - 1)[:, None] * stride_cl
    ty = conv_state.dtype.element_ty
    tl.store(p_r + c_q[None, :] * stride_cd, s_q.to(ty), mask=m_r & (c_q[None, :] >= 0))
    tl.store(p_r + c_k[None, :] * stride_cd, s_k.to(ty), mask=m_r & (c_k[None, :] >= 0))
    tl.store(p_r + c_v[None, :] * stride_cd, s_v.to(ty), mask=m_r & (c_v[None, :] >= 0))

    if L2NORM:
        b_q = b_q / tl.sqrt(tl.sum(b_q * b_q) + EPS)
        b_k = b_k / tl.sqrt(tl.sum(b_k * b_k) + EPS)
    b_q = b_q * scale
    b_g = tl.load(f + i_b * stride_fb + i_h * K + o_k).to(tl.float32) + tl.load(dt_bias + i_h * K + o_k).to(tl.float32)
    # softplus, linear above 20 as in fla and torch
    b_g = -tl.exp(tl.load(A_log + i_h).to(tl.float32)) * tl.where(b_g < 20.0, tl.log(1 + tl.exp(b_g)), b_g)
    b_decay = tl.exp(b_g)
    b_beta = tl.load(beta + i_b * stride_bb + i_h * stride_bh).to(tl.float32)

    b_o = tl.zeros([V], dtype=tl.float32)
    for i_v in range(V // BV):
        o_v = i_v * BV + o_bv
        b_next = tl.load(p_h + (o_v + BV)[:, None] * stride_sv + o_k[None, :], mask=(o_v + BV < V)[:, None], other=0.0)
        # this tile's rows of v and, below, of o: selections between the [V] and [BV] vectors
        pick = o_va[None, :] == o_v[:, None]  # [BV, V]
        b_vt = tl.sum(tl.where(pick, b_v[None, :], 0.0), axis=1)
        b_h = b_h * b_decay[None, :]
        b_vt = (b_vt - tl.sum(b_h * b_k[None, :], 1)) * b_beta
        b_h = b_h + b_vt[:, None] * b_k[None, :]
        tl.store(p_h + o_v[:, None] * stride_sv + o_k[None, :], b_h)
        b_ot = tl.sum(b_h * b_q[None, :], 1)
        b_o += tl.sum(tl.where(pick, b_ot[:, None], 0.0), axis=0)
        b_h = b_next

    b_o = b_o * tl.rsqrt(tl.sum(b_o * b_o) / V + norm_eps) * tl.load(norm_w + o_va).to(tl.float32)
    b_o = b_o * tl.sigmoid(tl.load(gate + i_b * stride_zb + i_h * V + o_va).to(tl.float32))
    tl.store(out + i_b * stride_ob + i_h * stride_oh + o_va, b_o.to(out.dtype.element_ty))


def kda_decode_step(
    proj: torch.Tensor,
    conv_weight: torch.Tensor,
    conv_state: torch.Tensor,
    f: torch.Tensor,
    beta: torch.Tensor,
    gate: torch.Tensor,
    recurrent_state: torch.Tensor,
    state_indices: torch.Tensor,
    A_log: torch.Tensor,
    dt_bias: torch.Tensor,
    norm_weight: torch.Tensor,
    norm_eps: float,
    *,
    num_heads: int,
    scale: float | None = None,
    use_qk_l2norm_in_kernel: bool = True,
    block_v: int = 16,
    num_warps: int = 2,
) -> torch.Tensor:
    """A KDA layer's decode step, one launch; conv and recurrent slots updated in place.

    - ``proj [B, 2*H*K + H*V]``: q|k|v projections before the conv; ``conv_weight [2*H*K + H*V, KC]``;
      ``conv_state [num_slots+1, L, 2*H*K + H*V]`` SD view (DS pools pass ``.transpose(-1, -2)``);
    - ``f [B, H*K]`` (f_b_proj output), ``beta [B, H]`` (after sigmoid), ``gate [B, H*V]`` (g_b_proj output);
    - ``recurrent_state [num_slots+1, H, V, K]`` float32, ``state_indices [B]`` (one slot per sequence,
      the same in both pools); ``A_log`` (H elements), ``dt_bias [H*K]``, ``norm_weight [V]``.

    Returns ``RMSNorm(o) * norm_weight * sigmoid(gate)`` as ``[B, H, V]`` in ``proj.dtype``.
    NOTE: SiLU is the conv activation (KDA's); intermediate q/k/v/o stay in float32 (the unfused ops
    round them to the input dtype), so the two agree to bf16 rounding.
    """
    batch = proj.shape[0]
    heads = num_heads
    v_dim = norm_weight.numel()
    k_dim = f.shape[-1] // heads
    block_v = min(block_v, v_dim)  # small test models
    conv_dim = 2 * heads * k_dim + heads * v_dim
    kernel = conv_weight.shape[-1]
    state_len = conv_state.shape[1]
    if proj.shape[-1] != conv_dim or conv_weight.shape[0] != conv_dim or conv_state.shape[-1] != conv_dim:
        raise ValueError(
            f"kda_decode_step: proj {tuple(proj.shape)}, conv_weight {tuple(conv_weight.shape)} and conv_state "
            f"{tuple(conv_state.shape)} must all have 2*H*K + H*V = {conv_dim} channels"
        )
    if state_len < kernel - 1:
        raise ValueError(f"kda_decode_step: conv_state holds {state_len} rows, needs >= K-1 = {kernel - 1}")
    if tuple(recurrent_state.shape[1:]) != (heads, v_dim, k_dim) or recurrent_state.dtype != torch.float32:
        raise ValueError(
            f"kda_decode_step: recurrent_state must be float32 [num_slots+1, {heads}, {v_dim}, {k_dim}], "
            f"got {recurrent_state.dtype} {tuple(recurrent_state.shape)}"
        )
    if not recurrent_state[0].is_contiguous() or recurrent_state.stride(-2) != k_dim:
        raise ValueError(f"kda_decode_step: each slot of recurrent_state must be contiguous, strides {recurrent_state.stride()}")
    if k_dim & (k_dim - 1) or v_dim & (v_dim - 1) or v_dim % block_v:
        raise ValueError(f"kda_decode_step: K={k_dim} and V={v_dim} must be powers of two, V a multiple of {block_v}")
    out = torch.empty((batch, heads, v_dim), dtype=proj.dtype, device=proj.device)
    if batch == 0:
        return out
    f, gate = (t if t.stride(-1) == 1 else t.contiguous() for t in (f, gate))
    scale = k_dim**-0.5 if scale is None else scale
    _kda_decode_step_kernel[(batch * heads,)](
        proj, conv_weight, conv_state, f, beta, gate, norm_weight.contiguous(),
        A_log.reshape(heads).contiguous(), dt_bias.reshape(-1).contiguous(), out, recurrent_state, state_indices,
        scale, norm_eps,
        proj.stride(0), proj.stride(1), conv_weight.stride(0), conv_weight.stride(1),
        conv_state.stride(0), conv_state.stride(1), conv_state.stride(2),
        f.stride(0), beta.stride(0), beta.stride(1), gate.stride(0), out.stride(0), out.stride(1),
        recurrent_state.stride(0), recurrent_state.stride(1), recurrent_state.stride(2),
        H=heads, K=k_dim, V=v_dim, BV=block_v, L=state_len, LP=triton.next_power_of_2(state_len + 1), KC=kernel,
        EPS=L2NORM_EPS, L2NORM=use_qk_l2norm_in_kernel, num_warps=num_warps,
    )
    return out
