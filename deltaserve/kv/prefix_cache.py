"""Prefix caching for hybrid models: shared KV blocks plus state checkpoints of the linear layers.

Full-attention layers reuse a prefix through its KV blocks; linear layers cannot rebuild a state
from blocks, so the cache keeps **checkpoints**: the two states of every linear layer after the
first ``p`` tokens of some sequence, in pool slots the cache owns, each with a reference on the KV
blocks that cover those ``p`` tokens. A new sequence restores the longest cached prefix (at most
all tokens but the last): full blocks are shared, a partly filled last block is copied into a
fresh block (first ``p % block_size`` rows, all attention layers, one op), the states are copied
into the sequence's slot with one fused :func:`copy_slots`.

Checkpoint positions (``clip_chunk`` ends prefill chunks there, so the state is exact):

- every ``checkpoint_interval`` tokens, and the end of the tokens to compute (the prompt);
- where the sequence stops sharing full blocks with blocks already hashed or with the prompt of a
  running sequence: the end of a shared system prompt, found as soon as two requests share it;
- at release (finish, abort, preemption): the sequence's own slot is adopted, no copy, so the next
  turn of a chat (previous prompt + output + new text) hits.

A position that is cached already or promised by another running sequence never cuts a chunk.
Lookup: checkpoints are indexed by (chained hash of the full blocks before ``p``, the remaining
``p % block_size`` tokens); a hit compares all ``p`` tokens (block ``token_ids`` and remainder),
so a hash collision costs a miss, never a wrong answer. Eviction is least recently used, to stay
within ``budget_bytes`` (slots plus distinct blocks held) and whenever a sequence needs a slot or
blocks (``make_room``): running requests always win over cached entries.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Sequence as Seq

import torch

from deltaserve.engine.sequence import Sequence
from deltaserve.kv.block_manager import BlockManager
from deltaserve.state.copy import copy_slots
from deltaserve.state.pool import StatePool

ROOT_HASH = -1  # parent hash of a sequence's first block


def block_hash(parent: int, token_ids: Seq[int]) -> int:
    """Chained hash of one full block: it folds in the parent block's hash (``ROOT_HASH`` for block 0)."""
    return hash((parent, tuple(token_ids)))


@dataclass(eq=False)
class Checkpoint:
    """States after ``num_tokens`` tokens in ``slot``; ``block_ids`` cover tokens ``0..num_tokens-1``."""

    num_tokens: int
    parent_hash: int  # chained hash of the num_tokens // block_size full blocks (ROOT_HASH: none)
    remainder: tuple[int, ...]  # the num_tokens % block_size tokens after those blocks
    slot: int
    block_ids: list[int]


@dataclass
class _Live:
    """What the cache tracks of one running sequence."""

    hashes: list[int] = field(default_factory=list)  # chained hash of each full block seen so far
    num_registered: int = 0  # leading blocks of its table already registered in the block manager
    wanted: list[int] = field(default_factory=list)  # checkpoint positions ahead, ascending
    promised: list[tuple] = field(default_factory=list)  # index keys of those positions
    pending: list[int] = field(default_factory=list)  # hashes counted in PrefixCache._pending
    num_cached: int = 0  # tokens restored by match
    ran: bool = False  # a forward has computed some of its tokens


class PrefixCache:
    """The scheduler's prefix-cache hooks (see ``deltaserve.engine.prefix_hooks``) for hybrid models."""

    def __init__(
        self,
        block_manager: BlockManager,
        state_pool: StatePool,
        kv_cache: torch.Tensor | None,
        *,
        checkpoint_interval: int,
        budget_bytes: int,
    ):
        self.bm = block_manager
        self.pool = state_pool
        self.kv_cache = kv_cache  # [attn_layers, num_blocks, block_size, entry_dim] or None
        self.block_size = block_manager.block_size
        self.interval = checkpoint_interval
        self.budget_bytes = budget_bytes
        self.slot_bytes = state_pool.bytes_total // (state_pool.num_slots + 1)
        self.block_bytes = 0 if kv_cache is None else kv_cache[:, 0].numel() * kv_cache.element_size()
        self._index: dict[int, dict[tuple[int, ...], Checkpoint]] = {}  # parent hash -> remainder -> entry
        self._lru: OrderedDict[int, Checkpoint] = OrderedDict()  # id(entry) -> entry, oldest first
        self._holders: Counter[int] = Counter()  # block id -> checkpoints holding it
        self._pending: Counter[int] = Counter()  # block hashes of running sequences' tokens
        self._promised: set[tuple] = set()
        self._live: dict[int, _Live] = {}
        self.num_queries = self.num_hits = self.num_hit_tokens = 0
        self.num_stored = self.num_evicted = 0

    # ---- hooks -------------------------------------------------------------------------------

    def match(self, seq: Sequence) -> int:
        """Restore the longest cached prefix into ``seq`` (slot and blocks); returns its length."""
        self.num_queries += 1
        live = self._live[seq.seq_id] = _Live()
        hashes = self._hashes(seq, live, seq.num_tokens // self.block_size)
        hit = self._lookup(seq, hashes, seq.num_tokens - 1)
        num_cached = hit.num_tokens if hit is not None and self._restore(seq, hit) else 0
        live.num_cached = num_cached
        if num_cached:
            self.num_hits += 1
            self.num_hit_tokens += num_cached
        self._plan(seq, live, num_cached)
        return num_cached

    def clip_chunk(self, seq: Sequence, num_new_tokens: int) -> int:
        live = self._live.get(seq.seq_id)
        start = seq.num_computed_tokens
        for pos in live.wanted if live is not None else ():
            if pos > start:
                return min(num_new_tokens, pos - start)
        return num_new_tokens

    def on_computed(self, seq: Sequence) -> None:
        live = self._live.get(seq.seq_id)
        if live is None:
            return
        live.ran = True
        self._register(seq, live)
        while live.wanted and live.wanted[0] <= seq.num_computed_tokens:
            pos = live.wanted.pop(0)
            self._promised.discard(live.promised.pop(0))
            if pos == seq.num_computed_tokens:
                self._store(seq, live, pos, adopt=False)

    def on_release(self, seq: Sequence) -> None:
        """Checkpoint the state after all computed tokens by taking over ``seq.state_slot`` (then None)."""
        live = self._live.pop(seq.seq_id, None)
        if live is None:
            return
        self._promised.difference_update(live.promised)
        _decrement(self._pending, live.pending)
        if not live.ran:
            # NOTE: admitted and sent back at once (no blocks): its lookup is repeated later, count it then.
            self.num_queries -= 1
            self.num_hits -= live.num_cached > 0
            self.num_hit_tokens -= live.num_cached
        elif seq.num_computed_tokens > 0 and seq.state_slot is not None:
            self._register(seq, live)
            self._store(seq, live, seq.num_computed_tokens, adopt=True)

    def make_room(self, num_slots: int = 0, num_blocks: int = 0) -> None:
        """Evict least recently used checkpoints until the pools have these many free slots and blocks."""
        while self.pool.num_free_slots < num_slots or self.bm.num_free_blocks < num_blocks:
            if not self._evict_oldest():
                return

    def reset(self) -> None:
        """Drop every checkpoint and forget the hashes of free blocks; running sequences are untouched."""
        while self._evict_oldest():
            pass
        self.bm.forget_free_hashes()

    def stats(self) -> dict:
        return dict(
            prefix_cache_queries=self.num_queries,
            prefix_cache_hits=self.num_hits,
            prefix_cache_hit_tokens=self.num_hit_tokens,
            checkpoints_stored=self.num_stored,
            checkpoints_evicted=self.num_evicted,
            prefix_cache_checkpoints=len(self._lru),
            prefix_cache_blocks_held=len(self._holders),
            prefix_cache_bytes=self._bytes(),
            prefix_cache_budget_bytes=self.budget_bytes,
        )

    def checkpoints(self) -> list[Checkpoint]:
        """Cached entries, least recently used first."""
        return list(self._lru.values())

    # ---- lookup and restore ------------------------------------------------------------------

    def _hashes(self, seq: Sequence, live: _Live, num_blocks: int) -> list[int]:
        """``live.hashes`` extended to ``seq``'s first ``num_blocks`` full blocks."""
        bs, hashes = self.block_size, live.hashes
        for i in range(len(hashes), num_blocks):
            hashes.append(block_hash(hashes[-1] if hashes else ROOT_HASH, seq.token_ids[i * bs : (i + 1) * bs]))
        return hashes

    def _key(self, seq: Sequence, hashes: list[int], pos: int) -> tuple[int, tuple[int, ...]]:
        k = pos // self.block_size
        return (hashes[k - 1] if k else ROOT_HASH), tuple(seq.token_ids[k * self.block_size : pos])

    def _lookup(self, seq: Sequence, hashes: list[int], limit: int) -> Checkpoint | None:
        """The longest checkpoint of at most ``limit`` tokens whose tokens all equal ``seq``'s."""
        bs = self.block_size
        for k in range(min(len(hashes), limit // bs), -1, -1):
            best = None
            for remainder, entry in self._index.get(hashes[k - 1] if k else ROOT_HASH, {}).items():
                end = k * bs + len(remainder)
                if 0 < end <= limit and (best is None or len(remainder) > len(best.remainder)):
                    if tuple(seq.token_ids[k * bs : end]) == remainder and self._blocks_match(seq, entry, k):
                        best = entry
            if best is not None:
                return best
        return None

    def _blocks_match(self, seq: Sequence, entry: Checkpoint, num_full: int) -> bool:
        bs = self.block_size
        return all(
            self.bm.blocks[b].token_ids == seq.token_ids[i * bs : (i + 1) * bs]
            for i, b in enumerate(entry.block_ids[:num_full])
        )

    def _restore(self, seq: Sequence, entry: Checkpoint) -> bool:
        """Share ``entry``'s full blocks, copy its partial block and states; False (nothing kept) if no block."""
        num_full, rows = divmod(entry.num_tokens, self.block_size)
        self._lru.move_to_end(id(entry))
        for block_id in entry.block_ids[:num_full]:
            self.bm.share(seq, block_id)
        if rows:
            self.make_room(num_blocks=1)  # NOTE: entry is the newest now, so evicted last
            if id(entry) not in self._lru or not self.bm.can_allocate(1):
                self.bm.free(seq)
                return False
            self.bm.allocate(seq, entry.num_tokens)
            if self.kv_cache is not None:
                # [attn_layers, rows, entry_dim]: the rows before the sequence's first new token.
                self.kv_cache[:, seq.block_table[num_full], :rows] = self.kv_cache[:, entry.block_ids[num_full], :rows]
        copy_slots(self.pool, [entry.slot], [seq.state_slot])
        return True

    def _plan(self, seq: Sequence, live: _Live, num_cached: int) -> None:
        """Choose the checkpoint positions ``seq`` will stop at, and promise them."""
        bs, end = self.block_size, seq.num_tokens
        wanted = set(range((num_cached // self.interval + 1) * self.interval, end, self.interval))
        wanted.add(end)
        hashes = live.hashes
        shared = 0
        while shared < len(hashes) and (hashes[shared] in self.bm.hash_to_block_id or hashes[shared] in self._pending):
            shared += 1
        if num_cached < shared * bs < end:
            wanted.add(shared * bs)  # where seq leaves a prefix that others have or are computing
        for pos in sorted(wanted):
            key = self._key(seq, hashes, pos)
            parent, remainder = key
            if key in self._promised or remainder in self._index.get(parent, {}):
                continue
            live.wanted.append(pos)
            live.promised.append(key)
            self._promised.add(key)
        live.pending = list(hashes)
        self._pending.update(live.pending)

    # ---- store, register, evict --------------------------------------------------------------

    def _register(self, seq: Sequence, live: _Live) -> None:
        """Hash the blocks of ``seq`` that became full, so others can find and check them."""
        bs = self.block_size
        num_full = seq.num_computed_tokens // bs
        hashes = self._hashes(seq, live, num_full)
        for i in range(live.num_registered, num_full):
            block_id = seq.block_table[i]
            if self.bm.blocks[block_id].hash != hashes[i]:
                self.bm.register(block_id, hashes[i], seq.token_ids[i * bs : (i + 1) * bs])
        live.num_registered = max(live.num_registered, num_full)

    def _store(self, seq: Sequence, live: _Live, pos: int, adopt: bool) -> None:
        """Checkpoint ``seq``'s state after ``pos`` computed tokens: a copy, or its slot itself (``adopt``)."""
        parent, remainder = self._key(seq, self._hashes(seq, live, pos // self.block_size), pos)
        if remainder in self._index.get(parent, {}):
            entry = self._index[parent][remainder]
            if self._blocks_match(seq, entry, pos // self.block_size):
                self._lru.move_to_end(id(entry))
            return  # NOTE: a hash collision keeps the older entry: a miss later, never a wrong hit
        block_ids = seq.block_table[: -(-pos // self.block_size)]
        while self._bytes(block_ids) > self.budget_bytes or (not adopt and self.pool.num_free_slots == 0):
            if not self._evict_oldest():
                return
        if adopt:
            slot, seq.state_slot = seq.state_slot, None
        else:
            slot = self.pool.allocate(1)[0]
            copy_slots(self.pool, [seq.state_slot], [slot])
        self.bm.hold(block_ids)
        self._holders.update(block_ids)
        entry = Checkpoint(pos, parent, remainder, slot, list(block_ids))
        self._index.setdefault(parent, {})[remainder] = entry
        self._lru[id(entry)] = entry
        self.num_stored += 1

    def _bytes(self, new_block_ids: Seq[int] | None = None) -> int:
        """Bytes held now, or once one more checkpoint holds ``new_block_ids`` (and a slot)."""
        if new_block_ids is None:
            return len(self._lru) * self.slot_bytes + len(self._holders) * self.block_bytes
        extra = sum(1 for b in set(new_block_ids) if b not in self._holders)
        return (len(self._lru) + 1) * self.slot_bytes + (len(self._holders) + extra) * self.block_bytes

    def _evict_oldest(self) -> bool:
        if not self._lru:
            return False
        _, entry = self._lru.popitem(last=False)
        siblings = self._index[entry.parent_hash]
        del siblings[entry.remainder]
        if not siblings:
            del self._index[entry.parent_hash]
        self.pool.free([entry.slot])
        _decrement(self._holders, entry.block_ids)
        # NOTE: tail first, as BlockManager.free: a chain's head stays longest among free blocks.
        self.bm.release(list(reversed(entry.block_ids)))
        self.num_evicted += 1
        return True


def _decrement(counter: Counter, keys: Seq) -> None:
    """One count less per key; keys that reach zero are dropped."""
    for key in keys:
        counter[key] -= 1
        if counter[key] <= 0:
            del counter[key]
