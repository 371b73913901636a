"""States saved inside a prefill forward (prefix-cache checkpoints): the checks and the conv windows.

A checkpoint after ``offset`` new tokens of a sequence holds the two states a forward that ended
there would leave: the recurrent state (written by the chunked delta rule, which has it at every
chunk boundary) and the conv state, the last ``state_len`` conv inputs before that position, which
the prefill has in hand (:func:`save_conv_windows`). See
:class:`deltaserve.forward_context.StateCheckpoints` for the fields.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, NamedTuple

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


def chunk_in_rounds(
    chunk_fn: Callable[..., torch.Tensor],
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    recurrent_state: torch.Tensor,
    cu_seqlens: torch.Tensor,
    state_indices: torch.Tensor,
    has_initial_state: torch.Tensor,
    checkpoints: "StateCheckpoints",
    **kwargs,
) -> torch.Tensor:
    """A chunked delta rule that only keeps final states, made to save checkpoints: sequences are
    split at their checkpoint offsets and run in rounds, round ``r`` running every sequence's
    ``r``-th piece from the state the round before left in its slot, then copying that state to
    the checkpoint's slot.

    Exact: the pieces are whole chunks, so the chunk grid is the uncut one, and the state passes
    from round to round in the pool's dtype (float32 for KDA), as it does from chunk to chunk
    inside a kernel. The cost is more launches (one call per round), not more forward steps.
    ``chunk_fn`` has :func:`deltaserve.ops.delta_rule.chunk_delta_rule`'s signature.
    """
    out = torch.empty(v.shape, dtype=q.dtype, device=q.device)
    for r, plan in enumerate(_round_plans(q.device, checkpoints)):
        part = [t.index_select(0, plan.tokens) for t in (q, k, v, g, beta)]
        first = has_initial_state.index_select(0, plan.rows) if r == 0 else plan.all_initial
        slots = state_indices.index_select(0, plan.rows)
        out[plan.tokens] = chunk_fn(*part, recurrent_state, plan.cu_seqlens, slots, first, **kwargs)
        if plan.copy_to is not None:
            recurrent_state[plan.copy_to] = recurrent_state[plan.copy_from]
    return out


class _Round(NamedTuple):
    tokens: torch.Tensor  # [n] int64, the batch rows of this round's pieces
    rows: torch.Tensor  # [b] int64, the sequences that have a piece in this round
    cu_seqlens: torch.Tensor  # [b+1] int64 (the dtype fla takes, so nobody converts it per layer)
    all_initial: torch.Tensor  # [b] bool, True: after round 0 every piece continues its slot's state
    copy_from: torch.Tensor | None  # sequence slots whose state after this round is a checkpoint
    copy_to: torch.Tensor | None  # the checkpoint slots


def _round_plans(device: torch.device, checkpoints: "StateCheckpoints") -> list[_Round]:
    """The rounds of :func:`chunk_in_rounds`, built once per forward from host lists (the same tensors
    for every layer, and no read-back from the device).

    NOTE: the same objects for every layer also keep fla's identity cache of chunk indices hitting
    (a miss syncs with the host).
    """
    return checkpoints.on_device(("rounds", device), lambda: _make_round_plans(device, checkpoints))


def _make_round_plans(device: torch.device, checkpoints: "StateCheckpoints") -> list[_Round]:
    bounds = [0]
    for n in checkpoints.query_lens:
        bounds.append(bounds[-1] + n)
    seq_slots = checkpoints.seq_slots
    cuts: dict[int, list[tuple[int, int]]] = {}
    for b, offset, slot in zip(checkpoints.seq_indices, checkpoints.offsets, checkpoints.slots):
        cuts.setdefault(b, []).append((offset, slot))
    pieces = []  # per sequence: [(start, end, checkpoint slot or None)], offsets from its first token
    for b in range(len(bounds) - 1):
        marks = sorted(cuts.get(b, []))
        edges = [0] + [offset for offset, _ in marks] + [bounds[b + 1] - bounds[b]]
        pieces.append(list(zip(edges[:-1], edges[1:], [slot for _, slot in marks] + [None])))
    plans = []
    for r in range(max(len(p) for p in pieces)):
        rows = [b for b in range(len(pieces)) if len(pieces[b]) > r]
        tokens, cu = [], [0]
        for b in rows:
            start, end, _ = pieces[b][r]
            tokens.extend(range(bounds[b] + start, bounds[b] + end))
            cu.append(len(tokens))
        done = [(seq_slots[b], pieces[b][r][2]) for b in rows if pieces[b][r][2] is not None]
        copy_from, copy_to = (torch.tensor(c, device=device) for c in zip(*done)) if done else (None, None)
        plans.append(_Round(
            torch.tensor(tokens, device=device), torch.tensor(rows, device=device),
            torch.tensor(cu, dtype=torch.int64, device=device), torch.ones(len(rows), dtype=torch.bool, device=device),
            copy_from, copy_to,
        ))
    return plans
