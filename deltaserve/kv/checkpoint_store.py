"""What the prefix cache keeps: checkpoint entries with their pool slots and KV blocks, under a byte budget.

:class:`CheckpointStore` owns the slots and block references of the entries that
:class:`deltaserve.kv.checkpoint_index.CheckpointIndex` ranks; it admits an entry only if it is
worth what it must evict (value per byte, see the index), restores one into a sequence, and gives
slots and blocks back whenever running requests need them (``make_room``).
"""

from __future__ import annotations

import torch

from deltaserve.engine.sequence import Sequence
from deltaserve.kv.block_manager import BlockManager
from deltaserve.kv.checkpoint_index import PRIOR, Checkpoint, CheckpointIndex
from deltaserve.state.cache_ops import CacheOps
from deltaserve.state.pool import StatePool


class CheckpointStore:
    """Entries, their slots and blocks. ``kv_cache``: ``[attn_layers, num_blocks, block_size, entry_dim]`` or None;
    ``ops`` makes the copies (see :class:`deltaserve.state.cache_ops.CacheOps`)."""

    def __init__(self, block_manager: BlockManager, state_pool: StatePool, kv_cache: torch.Tensor | None,
                 budget_bytes: int, ops: CacheOps | None = None):
        self.bm = block_manager
        self.pool = state_pool
        self.kv_cache = kv_cache
        self.ops = ops if ops is not None else CacheOps(state_pool, kv_cache)
        self.block_size = block_manager.block_size
        self.budget_bytes = budget_bytes
        slot_bytes = state_pool.bytes_total // (state_pool.num_slots + 1)
        block_bytes = 0 if kv_cache is None else kv_cache[:, 0].numel() * kv_cache.element_size()
        self.index = CheckpointIndex(slot_bytes, block_bytes)
        self.num_stored = self.num_evicted = 0

    def blocks_match(self, token_ids: list[int], entry: Checkpoint, num_full: int) -> bool:
        """The token check of a hit: ``entry``'s first ``num_full`` blocks hold ``token_ids``' tokens."""
        bs = self.block_size
        return all(
            self.bm.blocks[b].token_ids == token_ids[i * bs : (i + 1) * bs]
            for i, b in enumerate(entry.block_ids[:num_full])
        )

    def restore(self, seq: Sequence, entry: Checkpoint) -> bool:
        """Share ``entry``'s full blocks, copy its partial block and states; False (nothing kept) if no block."""
        num_full, rows = divmod(entry.num_tokens, self.block_size)
        self.index.touch(entry, hit=True)
        for block_id in entry.block_ids[:num_full]:
            self.bm.share(seq, block_id)
        if rows:
            self.make_room(num_blocks=1)  # NOTE: entry was just hit, so it is among the last to go
            if entry not in self.index or not self.bm.can_allocate(1):
                self.bm.free(seq)
                return False
            self.bm.allocate(seq, entry.num_tokens)
            # [attn_layers, rows, entry_dim]: the tokens of the block before the sequence's first new one.
            self.ops.copy_kv_rows(entry.block_ids[num_full], seq.block_table[num_full], rows)
        self.ops.copy_states([entry.slot], [seq.state_slot])
        return True

    def admit(self, seq: Sequence, key: tuple, pos: int, kind: str, slot: int | None) -> Checkpoint | None:
        """Add the entry ``key`` of ``seq``'s first ``pos`` tokens in ``slot`` (None: a fresh one), if new
        and worth its bytes: lower-priority entries are evicted to fit the budget (and free a slot). None
        when it is cached already or worth less than what it would have to evict."""
        existing = self.index.get(key)
        if existing is not None:
            if existing.num_tokens == pos and self.blocks_match(seq.token_ids, existing, pos // self.block_size):
                # NOTE: taken again: where a second sequence branches off, an interval entry becomes a branch point.
                if PRIOR[kind] > PRIOR[existing.kind]:
                    existing.kind = kind
                if existing.ready:
                    self.index.touch(existing)
            return None  # NOTE: a hash collision keeps the older entry: a miss later, never a wrong hit
        block_ids = seq.block_table[: -(-pos // self.block_size)]
        priority = self.index.new_priority(pos, kind, block_ids)
        while self.index.bytes_held(block_ids) > self.budget_bytes or (slot is None and self.pool.num_free_slots == 0):
            if not self.evict(below=priority):
                return None
        if slot is None:
            slot = self.pool.allocate(1)[0]
        self.bm.hold(block_ids)
        entry = Checkpoint(pos, key[0], key[1], slot, list(block_ids), kind)
        self.index.add(entry)
        self.num_stored += 1
        return entry

    def make_room(self, num_slots: int = 0, num_blocks: int = 0) -> None:
        """Evict the lowest-valued entries until the pools have these many free slots and blocks."""
        while self.pool.num_free_slots < num_slots or self.bm.num_free_blocks < num_blocks:
            if not self.evict():
                return

    def evict(self, below: float = float("inf")) -> bool:
        """Evict the lowest-priority ready entry if its priority is at most ``below``; False if none."""
        entry = self.index.evict(below)
        if entry is None:
            return False
        self.drop(entry)
        self.num_evicted += 1
        return True

    def drop(self, entry: Checkpoint) -> None:
        """Give ``entry``'s slot and block references back (``entry`` is no longer indexed after)."""
        if entry in self.index:
            self.index.remove(entry)
        self.pool.free([entry.slot])
        # NOTE: tail first, as BlockManager.free: a chain's head stays longest among the free blocks.
        self.bm.release(list(reversed(entry.block_ids)))
