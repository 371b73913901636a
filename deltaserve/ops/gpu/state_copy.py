"""Fused Triton copies of per-request state between pool slots, all layers and pairs in one launch per tensor.

GPU path of :mod:`deltaserve.state.copy` (which validates the slot ids before calling here). A pool
tensor is ``[layers, slots + 1, *state_shape]``, contiguous, so one slot of one layer is a contiguous
row of ``prod(state_shape)`` elements: a copy of ``N`` pairs over ``layers`` layers is
``layers * N`` row copies, which one flat grid covers.
"""

from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

from deltaserve.state.pool import StatePool

# Elements per program: 16 KiB of fp32 / 8 KiB of bf16, 32 per thread at 4 warps (16-byte accesses).
_BLOCK = 4096


# NOTE: the pair count changes with every call: no specialisation on it, no recompiles.
@triton.jit(do_not_specialize=["num_pairs"])
def _copy_rows_kernel(
    base, src, dst,
    num_pairs, row_numel, blocks_per_row, stride_layer, stride_slot,
    BLOCK: tl.constexpr,
):
    # pid -> (layer, pair, block); the block index varies fastest so neighbouring programs
    # stream neighbouring memory of one row.
    pid = tl.program_id(0).to(tl.int64)
    i_blk = pid % blocks_per_row
    rest = pid // blocks_per_row
    i_pair = rest % num_pairs
    i_layer = rest // num_pairs
    s = tl.load(src + i_pair).to(tl.int64)
    d = tl.load(dst + i_pair).to(tl.int64)
    o = i_blk * BLOCK + tl.arange(0, BLOCK)
    m = o < row_numel
    layer_off = i_layer * stride_layer
    v = tl.load(base + layer_off + s * stride_slot + o, mask=m)
    tl.store(base + layer_off + d * stride_slot + o, v, mask=m)


def copy_rows(tensor: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> None:
    """In place, one launch: ``tensor[:, dst[i]] = tensor[:, src[i]]`` for a ``[layers, slots, ...]`` pool tensor.

    ``src``/``dst`` are ``[N]`` integer slot ids on the tensor's device; ``dst`` disjoint from ``src``.
    """
    if not tensor.is_contiguous():
        raise ValueError(f"pool tensor must be contiguous, got strides {tensor.stride()}")
    num_layers, num_rows = tensor.shape[0], tensor.shape[1]
    row_numel = tensor[0, 0].numel()
    num_pairs = src.numel()
    if num_pairs == 0 or num_layers == 0 or row_numel == 0:
        return
    blocks_per_row = triton.cdiv(row_numel, _BLOCK)
    grid = (num_layers * num_pairs * blocks_per_row,)
    _copy_rows_kernel[grid](
        tensor, src, dst,
        num_pairs, row_numel, blocks_per_row, num_rows * row_numel, row_numel,
        BLOCK=_BLOCK, num_warps=4,
    )


def _groups(pool: StatePool, group: str | None) -> list[str]:
    return list(pool.groups) if group is None else [group]


def copy_slots(pool: StatePool, src: torch.Tensor, dst: torch.Tensor, group: str | None = None) -> None:
    """``state[:, dst[i]] = state[:, src[i]]`` for both states of every layer (see :func:`deltaserve.state.copy.copy_slots`).

    One launch per pool tensor (a group's conv tensor and recurrent tensor); no host sync.
    """
    src = src.to(device=pool.device, dtype=torch.int64).contiguous()
    dst = dst.to(device=pool.device, dtype=torch.int64).contiguous()
    for name in _groups(pool, group):
        for tensor in (pool.conv[name], pool.recurrent[name]):
            if tensor is not None:
                copy_rows(tensor, src, dst)


@triton.jit(do_not_specialize=["num_pairs"])
def _shift_conv_kernel(
    conv, src, dst, shift,
    num_pairs, D,
    stride_layer, stride_slot, stride_l, stride_d,
    L: tl.constexpr, BD: tl.constexpr,
):
    # dst[t] = src[t + shift] for t + shift < L, else dst[t] keeps its value. Ascending t reads
    # row t + shift >= t before it is written, so dst == src (the same slot) is safe: each channel
    # lives in one thread.
    i_lp, i_d = tl.program_id(0).to(tl.int64), tl.program_id(1)
    i_pair = i_lp % num_pairs
    i_layer = i_lp // num_pairs
    s = tl.load(src + i_pair).to(tl.int64)
    d = tl.load(dst + i_pair).to(tl.int64)
    n = tl.load(shift + i_pair).to(tl.int64)
    o_d = i_d * BD + tl.arange(0, BD)
    m_d = o_d < D
    p_src = conv + i_layer * stride_layer + s * stride_slot + o_d * stride_d
    p_dst = conv + i_layer * stride_layer + d * stride_slot + o_d * stride_d
    for t in tl.static_range(L):
        m = m_d & (t + n < L)
        v = tl.load(p_src + (t + n) * stride_l, mask=m)
        tl.store(p_dst + t * stride_l, v, mask=m)


def copy_spec_decode_states(
    pool: StatePool,
    src_blocks: torch.Tensor,
    dst: torch.Tensor,
    num_accepted_tokens: torch.Tensor,
    group: str | None = None,
) -> None:
    """GPU path of :func:`deltaserve.state.copy.copy_spec_decode_states` on checked inputs (``n >= 1``).

    Per group: one launch shifts the conv windows, one launch copies the recurrent states.
    """
    src_blocks = src_blocks.to(device=pool.device, dtype=torch.int64)
    dst = dst.to(device=pool.device, dtype=torch.int64).contiguous()
    shift = (num_accepted_tokens.to(device=pool.device, dtype=torch.int64) - 1).contiguous()
    recurrent_src = src_blocks.gather(1, shift[:, None]).squeeze(1).contiguous()
    conv_src = src_blocks[:, 0].contiguous()
    num_pairs = dst.numel()
    if num_pairs == 0:
        return
    for name in _groups(pool, group):
        layout = pool.groups[name].layout
        conv = pool.conv[name]
        # View as [layers, slots, L, D] whatever the orientation, so the kernel walks time by stride.
        view = conv if layout.conv_layout == "SD" else conv.transpose(-1, -2)
        num_layers, _, state_len, dim = view.shape
        if num_layers > 0:
            block_d = 256
            _shift_conv_kernel[(num_layers * num_pairs, triton.cdiv(dim, block_d))](
                view, conv_src, dst, shift,
                num_pairs, dim,
                view.stride(0), view.stride(1), view.stride(2), view.stride(3),
                L=state_len, BD=block_d, num_warps=2,
            )
        recurrent = pool.recurrent[name]
        if recurrent is not None:
            copy_rows(recurrent, recurrent_src, dst)


__all__: Sequence[str] = ("copy_rows", "copy_slots", "copy_spec_decode_states")
