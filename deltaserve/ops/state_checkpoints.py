"""States saved inside a prefill forward (prefix-cache checkpoints): the checks and the conv windows.

A checkpoint after ``offset`` new tokens of a sequence holds the two states a forward that ended
there would leave: the recurrent state (written by the chunked delta rule, which has it at every
chunk boundary) and the conv state, the last ``state_len`` conv inputs before that position, which
the prefill has in hand (:func:`save_conv_windows`). See
:class:`deltaserve.forward_context.StateCheckpoints` for the fields.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from deltaserve.forward_context import StateCheckpoints


def check_checkpoints(checkpoints: "StateCheckpoints", query_lens: list[int], num_slots: int, chunk_size: int) -> None:
    """ValueError naming the entry unless each offset is a positive multiple of ``chunk_size`` below
    its sequence's query length and each slot is a real pool slot (``1..num_slots``)."""
    for i, (b, offset, slot) in enumerate(zip(checkpoints.seq_indices, checkpoints.offsets, checkpoints.slots)):
        if not 0 <= b < len(query_lens):
            raise ValueError(f"checkpoints.seq_indices[{i}] = {b} must be in [0, {len(query_lens)})")
        if offset <= 0 or offset % chunk_size or offset >= query_lens[b]:
            raise ValueError(
                f"checkpoints.offsets[{i}] = {offset} must be a positive multiple of {chunk_size} below the "
                f"sequence's {query_lens[b]} new tokens"
            )
        if not 1 <= slot <= num_slots:
            raise ValueError(f"checkpoints.slots[{i}] = {slot} must be a pool slot in [1, {num_slots}]")


def save_conv_windows(x: torch.Tensor, conv_state: torch.Tensor, checkpoints: "StateCheckpoints") -> None:
    """``conv_state[slot] = x[t - L : t]`` for each checkpoint (``t`` its token index), in place.

    ``x [T, D]`` the conv inputs (pre-activation) of the batch, ``conv_state [num_slots+1, L, D]``
    (SD view). The window lies inside the sequence's new tokens, as offsets are at least one chunk
    (64 tokens) and ``L = kernel_size - 1 + num_spec`` is smaller.
    """
    state_len = conv_state.shape[1]
    if min(checkpoints.offsets) < state_len:
        raise ValueError(f"checkpoints.offsets must be >= the conv state length {state_len}, got {checkpoints.offsets}")

    def make() -> tuple[torch.Tensor, torch.Tensor]:
        rows = [list(range(t - state_len, t)) for t in checkpoints.token_indices]  # [N, L]
        return torch.tensor(rows, device=x.device), torch.tensor(checkpoints.slots, device=x.device)

    rows, slots = checkpoints.on_device(("conv", x.device, state_len), make)
    conv_state[slots] = x[rows].to(conv_state.dtype)
