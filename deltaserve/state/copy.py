"""Copies of per-request state between pool slots, across all layers of a group at once.

Two rules (ARCHITECTURE.md §1):

- :func:`copy_slots`: whole states, slot to slot (prefix-cache checkpoints and restores).
- :func:`copy_spec_decode_states`: after a speculative-decoding verify step, publish the state of
  the last accepted position into the request's slot, as vLLM's ``get_conv_copy_spec`` and
  ``get_temporal_copy_spec`` (vllm/model_executor/layers/mamba/mamba_utils.py) do.

Each state tensor is touched by one gather and one scatter over all layers and pairs: no Python
loop over layers or requests. On CUDA, :func:`copy_slots` and :func:`copy_spec_decode_states` hand
the (validated) work to ``deltaserve.ops.gpu.state_copy`` when that module imports.
"""

from __future__ import annotations

from typing import Sequence

import torch

from deltaserve.ops import gpu_impl
from deltaserve.state.pool import NULL_SLOT, StatePool

SlotIndex = torch.Tensor | Sequence[int]


def _groups(pool: StatePool, group: str | None) -> list[str]:
    if group is None:
        return list(pool.groups)
    if group not in pool.groups:
        raise KeyError(f"group {group!r} is not in the pool (groups: {sorted(pool.groups)})")
    return [group]


def _as_index(slots: SlotIndex, name: str, device: torch.device) -> torch.Tensor:
    if not isinstance(slots, torch.Tensor):
        return torch.as_tensor(slots, dtype=torch.long, device=device)
    if slots.dtype.is_floating_point or slots.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer slot ids, got dtype {slots.dtype}")
    return slots.to(device=device, dtype=torch.long)


def _host_ids(slots: SlotIndex, index: torch.Tensor) -> list[int]:
    """Slot ids on the host: a list as given (no device round trip), a tensor through ``index.tolist()``."""
    return index.tolist() if isinstance(slots, torch.Tensor) else [int(s) for s in slots]


def _check_slots(src_name: str, src: list[int], dst: list[int], pool: StatePool) -> None:
    """Every id a real slot (never the null slot 0), and ``dst`` without repeats."""
    for name, slots in ((src_name, src), ("dst", dst)):
        for value in slots:
            if not 1 <= value <= pool.num_slots:
                what = "the null slot 0" if value == NULL_SLOT else f"slot {value}"
                raise ValueError(f"{name} holds {what}; allowed slots are 1..{pool.num_slots}")
    if len(set(dst)) != len(dst):
        raise ValueError(f"dst holds a slot more than once: {dst}")


def _check_pairs(src: list[int], dst: list[int], pool: StatePool) -> None:
    """Host-side checks of a copy's slot ids (no device round trip when ids come as lists)."""
    if len(src) != len(dst):
        raise ValueError(f"src has {len(src)} slots but dst has {len(dst)}")
    _check_slots("src", src, dst, pool)
    # NOTE: a slot that is both read and written would make the result depend on the order in
    # which a fused kernel visits pairs; chains of copies are the caller's to sequence.
    overlap = sorted(set(src) & set(dst))
    if overlap:
        raise ValueError(f"src and dst overlap in slots {overlap}; they must be disjoint")


def copy_slots(
    pool: StatePool, src: SlotIndex, dst: SlotIndex, group: str | None = None, *, check: bool = True
) -> None:
    """In place: ``state[:, dst[i]] = state[:, src[i]]`` for every state of every layer.

    ``src``, ``dst``: ``[N]`` slot ids (tensor or list); ``group=None`` copies every group. Both
    states of a layer are copied whole (conv windows and recurrent state). ``src`` and ``dst`` must
    be disjoint, ``dst`` without repeats, and ``dst`` never the null slot 0. The checks run on the
    host: free for lists, one device sync for CUDA tensors (``check=False`` skips them, e.g. inside
    a CUDA graph).
    """
    src_index = _as_index(src, "src", pool.device).flatten()
    dst_index = _as_index(dst, "dst", pool.device).flatten()
    names = _groups(pool, group)
    if check:
        _check_pairs(_host_ids(src, src_index), _host_ids(dst, dst_index), pool)
    if dst_index.numel() == 0:
        return
    if pool.device.type == "cuda" and (gpu := gpu_impl("state_copy", "copy_slots")) is not None:
        gpu(pool, src_index, dst_index, group)
        return
    copy_slots_torch(pool, src_index, dst_index, names)


def copy_slots_torch(pool: StatePool, src: torch.Tensor, dst: torch.Tensor, groups: Sequence[str]) -> None:
    """The torch reference of :func:`copy_slots` on already checked int64 ``src``/``dst`` ``[N]``."""
    for name in groups:
        for tensor in (pool.conv[name], pool.recurrent[name]):
            if tensor is not None:
                # [layers, N, ...] gathered first, then written: one launch each.
                tensor.index_copy_(1, dst, tensor.index_select(1, src))


def copy_spec_decode_states(
    pool: StatePool,
    src_block_slots: torch.Tensor | Sequence[Sequence[int]],
    dst: SlotIndex,
    num_accepted_tokens: torch.Tensor | Sequence[int],
    group: str | None = None,
) -> None:
    """In place: publish each request's state after its last accepted token into slot ``dst[i]``.

    - ``src_block_slots``: ``[N, 1 + num_spec]`` slots; column ``j`` holds the state after
      candidate position ``j`` of the verify step (column 0 also holds the conv window of all
      ``1 + num_spec`` positions, since ``conv_state_len = K - 1 + num_spec``).
    - ``num_accepted_tokens``: ``[N]`` in ``0..1 + num_spec``; ``n = max(num_accepted_tokens, 1)``
      (0 marks a stale row whose sampled tokens were discarded; vLLM clamps it the same way).
    - Conv state (``L = conv_state_len`` positions along the time axis, oldest first):
      ``dst[t] = src_block_slots[i, 0][t + n - 1]`` for ``t in 0..L-n``; positions ``L-n+1..L-1``
      of ``dst`` keep what they held. The window ending at the last accepted input thus sits at
      positions ``0..K-2``. SD shifts rows, DS shifts columns (vLLM's SD memcpy of
      ``state[src, n-1:]`` to the start of ``state[dst]``, and its fused kernel for DS).
    - Recurrent state: copied whole from ``src_block_slots[i, n - 1]``.

    All reads happen before any write, so ``dst[i]`` may be one of request ``i``'s own source slots.
    ``dst`` must be free of repeats and of the null slot 0.
    """
    dst_index = _as_index(dst, "dst", pool.device).flatten()
    src_blocks = _as_index(src_block_slots, "src_block_slots", pool.device)
    accepted = _as_index(num_accepted_tokens, "num_accepted_tokens", pool.device).flatten()
    num_requests = dst_index.numel()
    if src_blocks.dim() != 2 or src_blocks.shape[0] != num_requests:
        raise ValueError(
            f"src_block_slots must be [N, 1 + num_spec] with N = {num_requests} (len(dst)), "
            f"got shape {tuple(src_blocks.shape)}"
        )
    if accepted.numel() != num_requests:
        raise ValueError(f"num_accepted_tokens has {accepted.numel()} entries, expected N = {num_requests}")
    names = _groups(pool, group)
    if num_requests == 0:
        return
    num_columns = src_blocks.shape[1]
    # Host-side checks: ids given as lists are read as given; tensors cost one device round trip each.
    if isinstance(src_block_slots, torch.Tensor):
        src_list = src_blocks.flatten().tolist()
    else:
        src_list = [int(s) for row in src_block_slots for s in row]
    dst_list, accepted_list = _host_ids(dst, dst_index), _host_ids(num_accepted_tokens, accepted)
    _check_slots("src_block_slots", src_list, dst_list, pool)
    if any(not 0 <= n <= num_columns for n in accepted_list):
        raise ValueError(f"num_accepted_tokens must be in 0..{num_columns} (1 + num_spec), got {accepted_list}")
    accepted = accepted.clamp(min=1)
    max_shift = max(max(accepted_list), 1) - 1
    for name in names:
        layout = pool.groups[name].layout
        # NOTE: the shifted window must still hold K - 1 real inputs, which is what the
        # num_spec extra rows of conv_state_len = K - 1 + num_spec are for.
        if max_shift > layout.conv_state_len - (layout.conv_kernel_size - 1):
            raise ValueError(
                f"group {name!r}: num_accepted_tokens up to {max_shift + 1} needs conv_state_len >= "
                f"{layout.conv_kernel_size - 1 + max_shift} (layout num_spec >= {max_shift}), "
                f"but the layout has conv_state_len = {layout.conv_state_len} (num_spec = {layout.num_spec})"
            )
    if pool.device.type == "cuda" and (gpu := gpu_impl("state_copy", "copy_spec_decode_states")) is not None:
        gpu(pool, src_blocks, dst_index, accepted, group)
        return
    copy_spec_decode_states_torch(pool, src_blocks, dst_index, accepted, names)


def copy_spec_decode_states_torch(
    pool: StatePool,
    src_blocks: torch.Tensor,
    dst: torch.Tensor,
    num_accepted_tokens: torch.Tensor,
    groups: Sequence[str],
) -> None:
    """Torch reference of :func:`copy_spec_decode_states` on checked int64 inputs, ``n >= 1``."""
    shift = num_accepted_tokens - 1  # [N]
    recurrent_src = src_blocks.gather(1, shift[:, None]).squeeze(1)  # [N]
    conv_src = src_blocks[:, 0]  # [N]
    for name in groups:
        layout = pool.groups[name].layout
        conv = pool.conv[name]  # [layers, slots, L, D] (SD) or [layers, slots, D, L] (DS)
        state_len = layout.conv_state_len
        time_axis = 2 if layout.conv_layout == "SD" else 3
        positions = torch.arange(state_len, device=conv.device)
        source_positions = positions[None, :] + shift[:, None]  # [N, L]
        keep_old = source_positions >= state_len  # [N, L]
        source_positions = source_positions.clamp(max=state_len - 1)
        # Broadcast [N, L] to the gathered block [layers, N, L, D] or [layers, N, D, L].
        view = [1, -1, 1, 1]
        view[time_axis] = state_len
        index = source_positions.view(view).expand(conv.shape[0], -1, *conv.shape[2:])
        shifted = conv.index_select(1, conv_src).gather(time_axis, index)
        mask = keep_old.view(view).expand_as(shifted)
        conv.index_copy_(1, dst, torch.where(mask, conv.index_select(1, dst), shifted))
        recurrent = pool.recurrent[name]
        if recurrent is not None:
            recurrent.index_copy_(1, dst, recurrent.index_select(1, recurrent_src))
