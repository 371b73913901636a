"""Batch metadata for one forward, set by the model runner and read by the few layers that need it.

Model code takes ``(positions, hidden_states)``; cu_seqlens, state slots and block tables reach
the KDA and MLA layers through :func:`get_forward_context` inside ``with forward_context(...)``.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch


@dataclass(frozen=True)
class StateCheckpoints:
    """States to save inside one forward, without ending a chunk (prefix-cache checkpoints).

    Entry ``i``: after the first ``offsets[i]`` new tokens of sequence ``seq_indices[i]`` of the
    batch, copy the layer's two states into pool slot ``slots[i]``: the recurrent state, and as
    conv state the last ``state_len`` conv inputs before that position. Host lists; ``offsets``
    are positive multiples of the chunked kernel's chunk size, below the sequence's query length.
    """

    seq_indices: list[int]
    offsets: list[int]
    slots: list[int]
    token_indices: list[int]  # flat batch index of the first token after each checkpoint
    # NOTE: host copies of the batch's query lengths and state slots, so no op reads them back from the device.
    query_lens: list[int]
    seq_slots: list[int]
    _device_cache: dict = field(default_factory=dict, compare=False, repr=False)

    def __len__(self) -> int:
        return len(self.slots)

    def on_device(self, key: tuple, make) -> object:
        """``make()`` once per forward for ``key`` (device tensors every layer reuses: one copy, not one per layer)."""
        if key not in self._device_cache:
            self._device_cache[key] = make()
        return self._device_cache[key]

    @classmethod
    def from_batch(
        cls, per_seq: list[list[tuple[int, int]]], query_lens: list[int], seq_slots: list[int]
    ) -> "StateCheckpoints | None":
        """From ``(offset, slot)`` pairs per sequence (the scheduler's); None when there are none."""
        rows, start = [], 0
        for b, (pairs, n) in enumerate(zip(per_seq, query_lens)):
            rows += [(b, offset, slot, start + offset) for offset, slot in sorted(pairs)]
            start += n
        if not rows:
            return None
        return cls(*(list(column) for column in zip(*rows)), list(query_lens), list(seq_slots))

    def for_sequence(self, b: int) -> list[tuple[int, int]]:
        """``(offset, slot)`` pairs of sequence ``b``, ascending."""
        return [(o, s) for i, o, s in zip(self.seq_indices, self.offsets, self.slots) if i == b]


@dataclass
class ForwardContext:
    """One flat token batch of ``B`` sequences and ``T`` tokens.

    - ``cu_seqlens``: ``[B+1]`` int32, token offsets of each sequence's new tokens in the batch.
    - ``query_lens`` / ``num_computed_tokens``: host lists ``[B]``: new tokens, and tokens already
      in the state and KV cache before this step (``> 0`` means the sequence has an initial state).
    - ``state_indices``: ``[B]`` int32, the pool slot of each sequence (``0`` = null slot for padding).
    - ``has_initial_state``: ``[B]`` bool, read the slot's state (True) or start from zeros.
    - ``block_tables``: ``[B, max_blocks]`` int32 KV block ids (``-1`` padding) for full-attention layers.
    - ``slot_mapping``: ``[T]`` int64, flat KV cache position (``block * block_size + offset``) of each
      new token, ``-1`` where nothing is written.
    - ``checkpoints``: states the linear layers save inside this forward, or None.
    - ``spec_decode``: the verify rows of a speculative step (a ``deltaserve.spec_decode.VerifyBatch``,
      the first rows of the batch), else None: linear layers then read their states without writing
      them and keep their inputs for the commit.
    """

    cu_seqlens: torch.Tensor
    query_lens: list[int]
    num_computed_tokens: list[int]
    state_indices: torch.Tensor
    has_initial_state: torch.Tensor
    block_tables: torch.Tensor | None = None
    slot_mapping: torch.Tensor | None = None
    block_size: int = 16
    checkpoints: StateCheckpoints | None = None
    spec_decode: Any = None

    # NOTE: cached: every KDA/MLA layer reads these once per forward, and the host lists they
    # derive from are not changed after the context is built.

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens)

    @functools.cached_property
    def num_tokens(self) -> int:
        """``T``, the new tokens of all sequences."""
        return sum(self.query_lens)

    @functools.cached_property
    def is_decode_only(self) -> bool:
        return all(n == 1 for n in self.query_lens) and all(c > 0 for c in self.num_computed_tokens)

    @functools.cached_property
    def seq_lens(self) -> list[int]:
        """Total tokens of each sequence once this step's tokens are in."""
        return [c + q for c, q in zip(self.num_computed_tokens, self.query_lens)]


_current: contextvars.ContextVar[ForwardContext | None] = contextvars.ContextVar("forward_context", default=None)


@contextlib.contextmanager
def forward_context(ctx: ForwardContext) -> Iterator[ForwardContext]:
    """Make ``ctx`` the current batch metadata for the duration of the block."""
    token = _current.set(ctx)
    try:
        yield ctx
    finally:
        _current.reset(token)


def get_forward_context() -> ForwardContext:
    ctx = _current.get()
    if ctx is None:
        raise RuntimeError("no forward context is set: run the model inside `with forward_context(...)`")
    return ctx


def make_forward_context(
    query_lens: list[int],
    num_computed_tokens: list[int],
    state_indices: list[int],
    *,
    block_tables: list[list[int]] | None = None,
    block_size: int = 16,
    checkpoints: list[list[tuple[int, int]]] | None = None,
    device: torch.device | str = "cpu",
) -> ForwardContext:
    """Build a context from host lists: the model runner's one way to do it (tests use it too).

    Each list becomes one tensor and one host-to-device copy; ``block_tables`` rows are padded
    with ``-1`` and ``slot_mapping`` is derived from them. ``checkpoints``: ``(offset, slot)`` pairs
    per sequence (see :class:`StateCheckpoints`).
    """
    cu = [0]
    for n in query_lens:
        cu.append(cu[-1] + n)

    def to_device(values, dtype) -> torch.Tensor:
        return host_to_device(values, device, dtype)

    tables = slots = None
    if block_tables is not None:
        width = max((len(t) for t in block_tables), default=0) or 1
        tables = to_device([t + [-1] * (width - len(t)) for t in block_tables], torch.int32)
        mapping: list[int] = []
        for table, start, n in zip(block_tables, num_computed_tokens, query_lens):
            extend_slot_mapping(mapping, table, start, start + n, block_size)
        slots = to_device(mapping, torch.int64)
    return ForwardContext(
        cu_seqlens=to_device(cu, torch.int32),
        query_lens=list(query_lens),
        num_computed_tokens=list(num_computed_tokens),
        state_indices=to_device(state_indices, torch.int32),
        has_initial_state=to_device([c > 0 for c in num_computed_tokens], torch.bool),
        block_tables=tables,
        slot_mapping=slots,
        block_size=block_size,
        checkpoints=StateCheckpoints.from_batch(checkpoints, query_lens, state_indices) if checkpoints else None,
    )


def host_to_device(values: list, device: torch.device | str, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """A tensor of host ``values`` on ``device``, copied without blocking: no wait for the device's queued work.

    NOTE: ``torch.tensor(values, device=cuda)`` would synchronise the stream after its copy.
    """
    return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)


def extend_slot_mapping(slot_mapping: list[int], block_table: list[int], start: int, end: int, block_size: int) -> None:
    """Append the flat KV slots of positions ``start..end-1`` (in place), one ``range`` per block."""
    # NOTE: per block, not per token: a 2048-token prefill chunk is ~130 ranges, not 2048 divisions.
    pos = start
    while pos < end:
        index = pos // block_size
        block_end = min(end, (index + 1) * block_size)
        # The flat slot of position p in this block is base + p.
        base = block_table[index] * block_size - index * block_size
        slot_mapping.extend(range(base + pos, base + block_end))
        pos = block_end
