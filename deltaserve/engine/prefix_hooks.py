"""Where a prefix cache plugs into the scheduler; the default caches nothing.

The scheduler calls, in a sequence's life:

1. ``match(seq)`` once, when a waiting sequence has just received its state slot and before its
   first chunk (``seq.num_computed_tokens == 0``, empty block table). A cache returns how many
   leading tokens it restored: the shared KV blocks appended to ``seq.block_table`` with
   ``BlockManager.share`` and the two states of every linear layer copied into ``seq.state_slot``.
   It must return fewer than ``seq.num_tokens`` (the last token is always computed, for logits).
2. ``clip_chunk(seq, num_new_tokens)`` for every chunk: a cache may end a chunk early so that it
   ends on a checkpoint position (a recurrent state can only be saved where a forward stops).
3. ``checkpoint_slots(seq, num_new_tokens)`` for every prefill chunk of the batch, once the batch
   is final: ``(offset, slot)`` pairs asking the forward to save the states after ``offset`` of
   the chunk's tokens into ``slot`` without ending the chunk (offsets are multiples of the chunked
   kernel's chunk size, below ``num_new_tokens``).
4. ``on_computed(seq)`` after each forward that advanced ``seq.num_computed_tokens``: register
   newly full blocks (chained hash, tokens) and save state checkpoints.
5. ``on_release(seq)`` before the sequence's blocks and slot are freed (finish, abort, preemption).
   A cache may keep the slot (a checkpoint of the state after all computed tokens): it then sets
   ``seq.state_slot = None`` and the scheduler does not free it.

And ``make_room(num_slots, num_blocks)`` whenever a sequence needs a state slot or KV blocks that
are not free: a cache evicts what it holds until they are (running requests win over the cache).
"""

from __future__ import annotations

from typing import Protocol

from deltaserve.engine.sequence import Sequence


class PrefixCacheHooks(Protocol):
    def match(self, seq: Sequence) -> int: ...

    def clip_chunk(self, seq: Sequence, num_new_tokens: int) -> int: ...

    def checkpoint_slots(self, seq: Sequence, num_new_tokens: int) -> list[tuple[int, int]]: ...

    def on_computed(self, seq: Sequence) -> None: ...

    def on_release(self, seq: Sequence) -> None: ...

    def make_room(self, num_slots: int = 0, num_blocks: int = 0) -> None: ...

    def stats(self) -> dict: ...


class NoPrefixCache:
    """Every lookup misses; nothing is kept."""

    def match(self, seq: Sequence) -> int:
        return 0

    def clip_chunk(self, seq: Sequence, num_new_tokens: int) -> int:
        return num_new_tokens

    def checkpoint_slots(self, seq: Sequence, num_new_tokens: int) -> list[tuple[int, int]]:
        return []

    def on_computed(self, seq: Sequence) -> None:
        pass

    def on_release(self, seq: Sequence) -> None:
        pass

    def make_room(self, num_slots: int = 0, num_blocks: int = 0) -> None:
        pass

    def stats(self) -> dict:
        return {}
