"""The delta rule on the GPU: fla-core's chunked prefill (KDA and GDN), the project's Triton decode kernel.

Same contract as :mod:`deltaserve.ops.delta_rule`. The pool stores each head's state ``(Dv, Dk)``
(``[num_slots+1, Hv, V, K]``), which is fla's ``state_v_first=True`` layout, so no transpose is ever
materialised. Recurrent states may be float32 or bfloat16; all arithmetic is float32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from fla.ops.gated_delta_rule import chunk_gated_delta_rule as fla_chunk_gated_delta_rule
from fla.ops.gated_delta_rule import fused_recurrent_gated_delta_rule as fla_fused_recurrent_gated_delta_rule
from fla.ops.kda import chunk_kda as fla_chunk_kda
from fla.ops.kda.fused_recurrent import fused_recurrent_kda_fwd as fla_fused_recurrent_kda_fwd

from deltaserve.ops.delta_rule import L2NORM_EPS, DeltaRuleShape, check_shapes
from deltaserve.ops.gpu.chunk_states import chunk_index, chunk_with_states
from deltaserve.ops.gpu.delta_rule_varlen import _check_blocks, _check_state, _last_dim_contiguous
from deltaserve.ops.gpu.norm import l2norm
from deltaserve.ops.state_checkpoints import check_checkpoints

_cu_cache: list = [None, None]  # [the caller's cu_seqlens, its int64 copy]


def _long_cu_seqlens(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """``cu_seqlens`` as int64, the same tensor object for the same input object.

    NOTE: fla caches chunk indices on the identity of the cu_seqlens tensor it gets (and building
    them syncs with the host); all linear layers of one forward share the runner's cu_seqlens, so
    converting it once keeps fla's cache hit for every layer after the first. Like fla's cache,
    this assumes a cu_seqlens tensor is not rewritten in place between calls.
    """
    if cu_seqlens.dtype == torch.long:
        return cu_seqlens
    if _cu_cache[0] is not cu_seqlens:
        _cu_cache[0], _cu_cache[1] = cu_seqlens, cu_seqlens.to(torch.long)
    return _cu_cache[1]


def _checkpoint_chunks(checkpoints, device: torch.device, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per checkpoint, the flat chunk index of its boundary and its slot, on ``device`` (built once per forward)."""

    def make() -> tuple[torch.Tensor, torch.Tensor]:
        chunks = [chunk_index(checkpoints.query_lens, b, offset, chunk_size)
                  for b, offset in zip(checkpoints.seq_indices, checkpoints.offsets)]  # fmt: skip
        return torch.tensor(chunks, device=device), torch.tensor(checkpoints.slots, device=device)

    return checkpoints.on_device(("chunks", device, chunk_size), make)


def chunk_delta_rule(
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
    checkpoints=None,
) -> torch.Tensor:
    """Varlen chunked delta rule through fla: ``chunk_gated_delta_rule`` for a per-head gate (GDN, GVA in
    the kernel), ``chunk_kda`` for a per-channel one. Initial states are gathered from the slots (zeros
    where ``has_initial_state`` is False), final states scattered back. Returns ``o [T, Hv, V]``.

    ``checkpoints``: the states at those chunk boundaries are written into their slots from the
    same pass (:mod:`deltaserve.ops.gpu.chunk_states`: fla's pipeline with its per-chunk states kept
    in float32, outputs and final states equal to fla's own call).
    """
    shape = check_shapes(q, k, v, g, beta, recurrent_state, "chunk_delta_rule")
    _check_state(recurrent_state, "chunk_delta_rule")
    if checkpoints is not None:
        # NOTE: checked on the context's host lists: reading cu_seqlens back would sync every layer.
        check_checkpoints(checkpoints, checkpoints.query_lens, recurrent_state.shape[0] - 1, chunk_size)
    num_seqs = state_indices.shape[0]
    if q.shape[0] == 0 or num_seqs == 0:
        return torch.empty(v.shape, dtype=q.dtype, device=q.device)
    index = state_indices.to(torch.long)
    initial = recurrent_state.index_select(0, index).float()  # [N, Hv, V, K]
    # NOTE: masked_fill, not a multiply: a fresh slot may hold anything, NaN included.
    initial.masked_fill_(~has_initial_state.to(torch.bool).view(-1, 1, 1, 1), 0.0)
    if use_qk_l2norm_in_kernel:
        # NOTE: normalised here, not inside fla's call: its L2 norm autotunes again for every bucket of
        # the token count (deltaserve/ops/gpu/norm.py); this one is tuned for two.
        q, k = l2norm(q), l2norm(k)
    if not shape.head_gate:
        group = shape.num_v_heads // shape.num_k_heads
        if group > 1:  # fla's KDA kernels take one q/k head per value head
            q, k = q.repeat_interleave(group, dim=1), k.repeat_interleave(group, dim=1)
    args = (q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), g.unsqueeze(0).float(), beta.unsqueeze(0))
    cu = _long_cu_seqlens(cu_seqlens)
    if checkpoints is not None:
        out, final, states = chunk_with_states(
            *args, head_gate=shape.head_gate, scale=q.shape[-1] ** -0.5 if scale is None else scale,
            initial_state=initial, cu_seqlens=cu, use_qk_l2norm_in_kernel=False, chunk_size=chunk_size,
        )  # fmt: skip
        chunks, slots = _checkpoint_chunks(checkpoints, q.device, chunk_size)
        recurrent_state[slots] = states[0].index_select(0, chunks).to(recurrent_state.dtype)
    else:
        fla_chunk = fla_chunk_gated_delta_rule if shape.head_gate else fla_chunk_kda
        # NOTE: no_grad, not inference_mode: inference tensors returned to the caller would refuse in-place ops.
        with torch.no_grad():
            out, final = fla_chunk(
                *args, scale=scale, initial_state=initial, output_final_state=True,
                use_qk_l2norm_in_kernel=False, state_v_first=True, cu_seqlens=cu, chunk_size=chunk_size,
            )  # fmt: skip
    recurrent_state.index_copy_(0, index, final.to(recurrent_state.dtype))
    return out.squeeze(0)


# PTX griddepcontrol (sm_90+), issued as fla's kernels do: wait for the previous grid's completion and
# memory; let the next grid (launched with launch_pdl) start its prologue.
@triton.jit
def _grid_dependency_wait():
    tl.inline_asm_elementwise("griddepcontrol.wait; // dummy $0", "=r", [], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _grid_launch_dependents():
    tl.inline_asm_elementwise("griddepcontrol.launch_dependents; // dummy $0", "=r", [], dtype=tl.int32,
                              is_pure=False, pack=1)  # fmt: skip


@triton.jit
def _delta_rule_decode_kernel(
    q, k, v, g, beta, o, state, state_indices,
    scale,
    stride_qb, stride_qh, stride_kb, stride_kh, stride_vb, stride_vh,
    stride_gb, stride_gh, stride_bb, stride_bh, stride_ob, stride_oh,
    stride_ss, stride_sh, stride_sv,
    HV: tl.constexpr, GROUP: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BV: tl.constexpr,
    HEAD_GATE: tl.constexpr, L2NORM: tl.constexpr, EPS: tl.constexpr, USE_PDL: tl.constexpr,
    EVICT: tl.constexpr,
):
    # One program: one (sequence, value head) and BV rows of its (V, K) state; the v-block varies
    # fastest so consecutive programs stream one contiguous head state. Value head i_hv reads q/k
    # head i_hv // GROUP (GVA, repeat_interleave order).
    NV: tl.constexpr = V // BV
    pid = tl.program_id(0).to(tl.int64)
    i_v = pid % NV
    i_bh = pid // NV
    i_b = i_bh // HV
    i_hv = i_bh % HV
    i_hk = i_hv // GROUP
    o_k = tl.arange(0, K)
    o_v = i_v * BV + tl.arange(0, BV)
    slot = tl.load(state_indices + i_b).to(tl.int64)
    p_h = state + slot * stride_ss + i_hv * stride_sh + o_v[:, None] * stride_sv + o_k[None, :]
    if EVICT:
        b_h = tl.load(p_h, eviction_policy="evict_first").to(tl.float32)  # [BV, K]
    else:
        b_h = tl.load(p_h).to(tl.float32)
    if USE_PDL:
        # NOTE: the state and slot ids were read above, before the previous kernel (which produced q, k, v,
        # g, beta) is done: the caller guarantees that kernel writes neither.
        _grid_dependency_wait()
    b_q = tl.load(q + i_b * stride_qb + i_hk * stride_qh + o_k).to(tl.float32)
    b_k = tl.load(k + i_b * stride_kb + i_hk * stride_kh + o_k).to(tl.float32)
    b_v = tl.load(v + i_b * stride_vb + i_hv * stride_vh + o_v).to(tl.float32)
    b_beta = tl.load(beta + i_b * stride_bb + i_hv * stride_bh).to(tl.float32)
    if HEAD_GATE:
        b_decay = tl.exp(tl.load(g + i_b * stride_gb + i_hv * stride_gh).to(tl.float32))
    else:
        b_decay = tl.exp(tl.load(g + i_b * stride_gb + i_hv * stride_gh + o_k).to(tl.float32))[None, :]
    if USE_PDL:
        _grid_launch_dependents()
    if L2NORM:
        b_q = b_q / tl.sqrt(tl.sum(b_q * b_q) + EPS)
        b_k = b_k / tl.sqrt(tl.sum(b_k * b_k) + EPS)
    b_q = b_q * scale
    b_h = b_h * b_decay
    b_v = (b_v - tl.sum(b_h * b_k[None, :], 1)) * b_beta
    b_h = b_h + b_v[:, None] * b_k[None, :]
    b_o = tl.sum(b_h * b_q[None, :], 1)
    if EVICT:
        tl.store(p_h, b_h.to(state.dtype.element_ty), eviction_policy="evict_first")
    else:
        tl.store(p_h, b_h.to(state.dtype.element_ty))
    tl.store(o + i_b * stride_ob + i_hv * stride_oh + o_v, b_o.to(o.dtype.element_ty))


def decode_config(batch: int, num_v_heads: int, v_dim: int) -> tuple[int, int]:
    """``(block_v, num_warps)`` of the decode kernel for a batch.

    NOTE: one warp per 8 rows of a head's state (4 at small batches, so that one request's 2 MiB spreads
    over 1024 programs at Qwen3-Next dims) measured best or within 2% of the best at batch 1..256 on an
    H200, for GDN and in KDA's decode step (benchmarks/RESULTS.md); 32 rows x 8 warps was 2-4% slower at 256.
    """
    rows = batch * num_v_heads * v_dim
    if rows <= 16 * 32 * 128:  # up to batch 16 at 32 heads of 128 rows
        return min(4, v_dim), 1
    return min(8, v_dim), 1


def fused_recurrent_delta_rule(
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
    block_v: int | None = None,
    num_warps: int | None = None,
    launch_pdl: bool = False,
    evict_first: bool = False,
) -> torch.Tensor:
    """Decode step (one token per sequence), one launch, in place on the slots.

    ``q, k [B, Hk, K]``, ``v [B, Hv, V]``, ``g [B, Hv]`` or ``[B, Hv, K]``, ``beta [B, Hv]``, any batch/head
    strides (views of a fused projection are read where they lie); returns ``o [B, Hv, V]`` in ``q.dtype``.
    ``launch_pdl`` (sm_90+, benchmarks only so far) starts the kernel while the previous one finishes and
    reads the slots' states before waiting for it: only valid when that kernel writes no state of these slots.
    """
    shape: DeltaRuleShape = check_shapes(q, k, v, g, beta, recurrent_state, "fused_recurrent_delta_rule", state_indices)
    _check_state(recurrent_state, "fused_recurrent_delta_rule")
    batch, k_dim, v_dim = q.shape[0], shape.k_dim, shape.v_dim
    default_bv, default_warps = decode_config(batch, shape.num_v_heads, v_dim)
    block_v = min(block_v or default_bv, v_dim)
    num_warps = num_warps or default_warps
    _check_blocks(k_dim, v_dim, block_v, "fused_recurrent_delta_rule")
    q, k, v, g = (_last_dim_contiguous(t) for t in (q, k, v, g))
    out = torch.empty((batch, shape.num_v_heads, v_dim), dtype=q.dtype, device=q.device)
    if batch == 0:
        return out
    scale = k_dim**-0.5 if scale is None else scale
    grid = (batch * shape.num_v_heads * (v_dim // block_v),)
    _delta_rule_decode_kernel[grid](
        q, k, v, g, beta, out, recurrent_state, state_indices,
        scale,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        g.stride(0), g.stride(1), beta.stride(0), beta.stride(1), out.stride(0), out.stride(1),
        recurrent_state.stride(0), recurrent_state.stride(1), recurrent_state.stride(2),
        HV=shape.num_v_heads, GROUP=shape.num_v_heads // shape.num_k_heads, K=k_dim, V=v_dim, BV=block_v,
        HEAD_GATE=shape.head_gate, L2NORM=use_qk_l2norm_in_kernel, EPS=L2NORM_EPS, USE_PDL=launch_pdl,
        EVICT=evict_first, num_warps=num_warps, **({"launch_pdl": True} if launch_pdl else {}),
    )  # fmt: skip
    return out


# NOTE: the row count changes every step: no specialisation on it, no recompiles.
@triton.jit(do_not_specialize=["num_rows"])
def _gdn_gate_kernel(a, b, A_log, dt_bias, g, beta, num_rows, stride_a, stride_b,
                     HV: tl.constexpr, BH: tl.constexpr, BT: tl.constexpr):
    o_t = tl.program_id(0) * BT + tl.arange(0, BT)
    o_h = tl.arange(0, BH)
    mask = (o_t < num_rows)[:, None] & (o_h < HV)[None, :]
    b_a = tl.load(a + o_t[:, None] * stride_a + o_h[None, :], mask=mask, other=0.0).to(tl.float32)
    b_b = tl.load(b + o_t[:, None] * stride_b + o_h[None, :], mask=mask, other=0.0).to(tl.float32)
    b_x = b_a + tl.load(dt_bias + o_h, mask=o_h < HV, other=0.0).to(tl.float32)[None, :]
    # softplus, linear above 20 as in fla and torch
    b_sp = tl.where(b_x < 20.0, tl.log(1 + tl.exp(b_x)), b_x)
    b_g = -tl.exp(tl.load(A_log + o_h, mask=o_h < HV, other=0.0).to(tl.float32))[None, :] * b_sp
    out = o_t[:, None] * HV + o_h[None, :]
    tl.store(g + out, b_g, mask=mask)
    tl.store(beta + out, tl.sigmoid(b_b), mask=mask)


def gdn_gate(a: torch.Tensor, b: torch.Tensor, A_log: torch.Tensor, dt_bias: torch.Tensor):
    """``(g, beta)`` float32 ``[T, Hv]`` in one launch; ``a, b`` may be row-strided views."""
    heads = A_log.numel()
    if a.dim() != 2 or a.shape[-1] != heads or b.shape != a.shape or dt_bias.numel() != heads:
        raise ValueError(
            f"gdn_gate: a {tuple(a.shape)} and b {tuple(b.shape)} must be [T, Hv] with A_log and dt_bias of "
            f"Hv elements, got {A_log.numel()} and {dt_bias.numel()}"
        )
    a, b = _last_dim_contiguous(a), _last_dim_contiguous(b)
    rows = a.shape[0]
    g = torch.empty((rows, heads), dtype=torch.float32, device=a.device)
    beta = torch.empty_like(g)
    if rows:
        block_t = 32
        _gdn_gate_kernel[(triton.cdiv(rows, block_t),)](
            a, b, A_log.reshape(heads).contiguous(), dt_bias.reshape(heads).contiguous(), g, beta, rows,
            a.stride(0), b.stride(0), HV=heads, BH=triton.next_power_of_2(heads), BT=block_t,
        )  # fmt: skip
    return g, beta


# ---- fla's decode kernels, the baselines of the benchmarks and tests ------------------------------


def fused_recurrent_kda_fla(q, k, v, g, beta, recurrent_state, state_indices, *, scale=None,
                            use_qk_l2norm_in_kernel=True) -> torch.Tensor:  # fmt: skip
    """KDA's decode step through fla's ``fused_recurrent_kda_fwd`` (slot-indexed, in place, V-first)."""
    check_shapes(q, k, v, g, beta, recurrent_state, "fused_recurrent_kda_fla")
    q, k, v, g, beta = (t.contiguous().unsqueeze(1) for t in (q, k, v, g, beta))  # [B, 1, H, *]
    out, _ = fla_fused_recurrent_kda_fwd(
        q, k, v, g.float(), beta,
        initial_state=recurrent_state,
        scale=scale,
        inplace_final_state=True,
        state_v_first=True,
        ssm_state_indices=state_indices,
        use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel,
    )  # fmt: skip
    return out.squeeze(1)


def fused_recurrent_gdn_fla(q, k, v, g, beta, initial_state, *, scale=None, use_qk_l2norm_in_kernel=True):
    """GDN's decode step through fla's ``fused_recurrent_gated_delta_rule``: out of place (fla 0.6.0 has no
    slot indices for GDN), ``initial_state [B, Hv, V, K]``; returns ``(o [B, Hv, V], final_state)``."""
    q, k, v, g, beta = (t.contiguous().unsqueeze(1) for t in (q, k, v, g, beta))  # [B, 1, H, *]
    with torch.no_grad():
        out, final = fla_fused_recurrent_gated_delta_rule(
            q, k, v, g.float(), beta=beta, scale=scale, initial_state=initial_state, output_final_state=True,
            use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel, state_v_first=True,
        )  # fmt: skip
    return out.squeeze(1), final
