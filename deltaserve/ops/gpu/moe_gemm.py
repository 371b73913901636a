"""Routed-expert GEMMs for decode-sized steps (up to ``moe.FEW_PAIRS`` (token, expert) pairs): decode and
speculative verify.

With up to a few dozen rows per expert, ``torch._grouped_mm`` spends much of its time on its per-group
set-up: at Kimi-Linear dims on an H200 it takes 1.4-2.9x the time of reading the experts' weights once,
these kernels 1.0-1.9x (``benchmarks/bench_moe.py``). Here each expert's weights are streamed once per
block of ``BLOCK_M`` of its rows (pairs grouped by :func:`moe_kernels.group_by_expert`; ``BLOCK_M``
about the mean rows per expert, 16 to 64):

- :func:`expert_gate_up`: rows gathered from ``x`` through ``token_of`` (no gathered copy), both the
  gate and the up block of ``w13[e]`` against them, and ``act(gate) * up`` from the float32
  accumulators: one launch where the grouped path takes a gather, a GEMM and an activation.
- :func:`expert_down`: the activated rows against ``w2[e]``, in the grouped order.

The grid is ``(row blocks, column blocks)``, sized for the worst case (``ceil(P / BLOCK_M)`` plus
one partial block per expert); each program finds its expert from the group ends on the device and
programs past the last block return at once, so the shapes are static (CUDA-graph safe) and nothing
reads back to the host. Tiles are fixed per ``BLOCK_M`` (no autotuning: no compile stall on a new
batch size; ``benchmarks/bench_moe.py --sweep`` measures them).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Activations the gate/up kernel applies in float32; others take the grouped path.
KERNEL_ACTIVATIONS = {"silu": 0, "swish": 0, "gelu": 1}
# Tiles by rows per block (BLOCK_M: tl.dot's smallest is 16): (BLOCK_N, BLOCK_K, num_warps, num_stages),
# the best of benchmarks/bench_moe.py --sweep on an H200 (32 experts, Kimi-Linear dims; summing the
# products in registers for experts of 1 or 4 rows lost to the 16-row tensor-core tile everywhere).
TILES = {16: (64, 128, 4, 3), 32: (64, 128, 4, 3), 64: (64, 64, 4, 3)}
FLOAT32_TILE = (16, (32, 64, 4, 2))  # float32 operands: smaller tiles (shared memory)


def block_m(num_pairs: int, num_experts: int) -> int:
    """Rows per block: about the mean rows per expert, 16 to 64."""
    mean = num_pairs // max(1, min(num_pairs, num_experts))
    return max(16, min(64, triton.next_power_of_2(max(1, mean))))


# NOTE: N and K stay specialised (a model has two pairs of them): their divisibility is what lets the
# masked weight loads vectorise; EVEN_K drops the K mask altogether.
@triton.jit
def _expert_gemm_kernel(
    a, stride_a, w, stride_we, stride_wn, out, stride_o, token_of, offs, N, K, E,
    GATHER: tl.constexpr, GATED: tl.constexpr, ACT: tl.constexpr, IEEE: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BE: tl.constexpr, EVEN_K: tl.constexpr,
):
    # Program m is the m-th block of BM rows in the grouped order, counting each expert's
    # ceil(rows / BM) blocks: find its expert from the group ends (a cumulative sum over E).
    pid_m = tl.program_id(0)
    o_e = tl.arange(0, BE)
    m_e = o_e < E
    ends = tl.load(offs + o_e, mask=m_e, other=0)
    begins = tl.load(offs + o_e - 1, mask=m_e & (o_e > 0), other=0)
    blocks = tl.where(m_e, tl.cdiv(ends - begins, BM), 0)
    first_block = tl.cumsum(blocks, 0) - blocks
    e = tl.sum((first_block + blocks <= pid_m).to(tl.int32), 0)
    if e >= E:
        return
    row0 = tl.sum(tl.where(o_e == e, begins + (pid_m - first_block) * BM, 0), 0)
    end = tl.sum(tl.where(o_e == e, ends, 0), 0)
    rows = row0 + tl.arange(0, BM)
    m_rows = rows < end
    if GATHER:
        src = tl.load(token_of + rows, mask=m_rows, other=0).to(tl.int64)
    else:
        src = rows.to(tl.int64)
    o_n = tl.program_id(1) * BN + tl.arange(0, BN)
    m_n = o_n < N
    w_e = w + e.to(tl.int64) * stride_we
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    acc_up = tl.zeros([BM, BN], dtype=tl.float32)
    for k0 in range(0, K, BK):
        o_k = k0 + tl.arange(0, BK)
        m_k = (o_k < K) | EVEN_K
        x = tl.load(a + src[:, None] * stride_a + o_k[None, :], mask=m_rows[:, None] & m_k[None, :], other=0.0)
        m_w = m_k[:, None] & m_n[None, :]
        w_g = tl.load(w_e + o_n[None, :].to(tl.int64) * stride_wn + o_k[:, None], mask=m_w, other=0.0)  # [BK, BN]
        if IEEE:
            acc += tl.dot(x, w_g, input_precision="ieee")
        else:
            acc += tl.dot(x, w_g)
        if GATED:
            w_u = tl.load(w_e + (N + o_n[None, :]).to(tl.int64) * stride_wn + o_k[:, None], mask=m_w, other=0.0)
            if IEEE:
                acc_up += tl.dot(x, w_u, input_precision="ieee")
            else:
                acc_up += tl.dot(x, w_u)
    if GATED:
        if ACT == 0:
            acc = acc * tl.sigmoid(acc) * acc_up
        else:
            acc = 0.5 * acc * (1.0 + tl.math.erf(acc * 0.7071067811865476)) * acc_up
    tl.store(out + rows[:, None].to(tl.int64) * stride_o + o_n[None, :], acc.to(out.dtype.element_ty),
             mask=m_rows[:, None] & m_n[None, :])


def _launch(a, w, out, token_of, offs, n, *, gather: bool, gated: bool, act: int) -> None:
    if w.stride(2) != 1:
        raise ValueError(f"expert weights need unit stride over their input dimension, strides {w.stride()}")
    if a.stride(-1) != 1:
        a = a.contiguous()
    num_pairs, num_experts = out.shape[0], w.shape[0]
    if a.dtype == torch.float32:
        bm, (bn, bk, warps, stages) = FLOAT32_TILE
    else:
        bm = block_m(num_pairs, num_experts)
        bn, bk, warps, stages = TILES[bm]
    # At most ceil(P / BM) full blocks plus one partial block per expert that has rows.
    grid = (triton.cdiv(num_pairs, bm) + min(num_pairs, num_experts), triton.cdiv(n, bn))
    _expert_gemm_kernel[grid](
        a, a.stride(0), w, w.stride(0), w.stride(1), out, out.stride(0), token_of, offs, n, w.shape[2], num_experts,
        GATHER=gather, GATED=gated, ACT=act, IEEE=a.dtype == torch.float32,
        BM=bm, BN=bn, BK=bk, BE=max(2, triton.next_power_of_2(num_experts)), EVEN_K=w.shape[2] % bk == 0,
        num_warps=warps, num_stages=stages,
    )  # fmt: skip


def expert_gate_up(
    x: torch.Tensor, w13: torch.Tensor, token_of: torch.Tensor, offs: torch.Tensor, activation: str = "silu"
) -> torch.Tensor:
    """``act(x[token_of[r]] @ w13[e, :I].T) * (x[token_of[r]] @ w13[e, I:].T)`` for each grouped row ``r`` of
    expert ``e`` (groups ending at ``offs``) -> ``[T*k, I]`` in ``x.dtype``."""
    inter = w13.shape[1] // 2
    out = torch.empty(token_of.shape[0], inter, dtype=x.dtype, device=x.device)
    if out.shape[0]:
        _launch(x, w13, out, token_of, offs, inter, gather=True, gated=True, act=KERNEL_ACTIVATIONS[activation])
    return out


def expert_down(h: torch.Tensor, w2: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """``h[r] @ w2[e].T`` for each grouped row ``r`` of expert ``e`` -> ``[T*k, hidden]`` in ``h.dtype``."""
    out = torch.empty(h.shape[0], w2.shape[1], dtype=h.dtype, device=h.device)
    if out.shape[0]:
        _launch(h, w2, out, offs, offs, w2.shape[1], gather=False, gated=False, act=0)
    return out
