"""Prefix caching for hybrid models: shared KV blocks plus state checkpoints of the linear layers.

Full-attention layers reuse a prefix through its KV blocks; linear layers cannot rebuild a state
from blocks, so the cache keeps **checkpoints**: the two states of every linear layer after the
first ``p`` tokens of some sequence, in pool slots the cache owns, each with a reference on the KV
blocks that cover those ``p`` tokens. A new sequence restores the longest cached prefix of at most
all its tokens but the last (the last is computed, for logits): full blocks are shared, a partly
filled last block is copied into a fresh block (its first ``p % block_size`` rows, all attention
layers, one op) that the sequence then fills, and the states are copied into the sequence's slot
with one fused :func:`copy_slots`.

Checkpoint positions; ``clip_chunk`` ends prefill chunks there, so the state is exact:

- the end of the tokens to compute (the prompt), and the release of a sequence (finish, abort,
  preemption), where its own slot is adopted, no copy: the next turn of a chat (previous prompt +
  output + new text) hits. Neither costs a forward step;
- branch points: where the sequence stops sharing full blocks with blocks already hashed or with
  the tokens of a running sequence, e.g. the end of a system prompt, as soon as a second request
  shares it (Marconi's admission rule, Pan et al., MLSys 2025: states only where reuse is seen);
- every ``checkpoint_interval`` tokens (the engine's default is the chunk size, where the chunks of
  a long prompt end anyway).

A position already cached, or promised by another running sequence, never cuts a chunk: a
checkpoint costs a forward step only where it is new. Eviction is least recently used, to stay
within ``budget_bytes`` and whenever a sequence needs a slot or blocks (``make_room``): running
requests always win over cached entries. Lookup and hashing: :mod:`deltaserve.kv.checkpoint_index`.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch

from deltaserve.engine.sequence import Sequence
from deltaserve.kv.block_manager import BlockManager
from deltaserve.kv.checkpoint_index import Checkpoint, CheckpointIndex, chain_hashes, checkpoint_key, decrement
from deltaserve.state.cache_ops import CacheOps
from deltaserve.state.pool import StatePool


@dataclass
class _Live:
    """What the cache tracks of one running sequence."""

    hashes: list[int] = field(default_factory=list)  # chained hashes of its full blocks seen so far
    num_registered: int = 0  # leading blocks of its table registered in the block manager
    wanted: list[int] = field(default_factory=list)  # checkpoint positions ahead, ascending
    promised: list[tuple] = field(default_factory=list)  # the keys of those positions
    pending: list[int] = field(default_factory=list)  # its hashes counted in PrefixCache._pending
    num_cached: int = 0  # tokens restored by match
    ran: bool = False  # a forward has computed some of its tokens


class PrefixCache:
    """The scheduler's prefix-cache hooks (``deltaserve.engine.prefix_hooks``) for hybrid models.

    ``kv_cache``: ``[attn_layers, num_blocks, block_size, entry_dim]`` or None (no attention layers).
    ``cache_ops`` makes the state and KV copies (default: on ``state_pool`` and ``kv_cache`` directly;
    under TP, rank 0's, which logs them for the other ranks).
    """

    def __init__(
        self,
        block_manager: BlockManager,
        state_pool: StatePool,
        kv_cache: torch.Tensor | None,
        *,
        checkpoint_interval: int,
        budget_bytes: int,
        cache_ops: CacheOps | None = None,
    ):
        self.ops = cache_ops if cache_ops is not None else CacheOps(state_pool, kv_cache)
        self.bm = block_manager
        self.pool = state_pool
        self.kv_cache = kv_cache
        self.block_size = block_manager.block_size
        self.interval = checkpoint_interval
        self.budget_bytes = budget_bytes
        slot_bytes = state_pool.bytes_total // (state_pool.num_slots + 1)
        block_bytes = 0 if kv_cache is None else kv_cache[:, 0].numel() * kv_cache.element_size()
        self.index = CheckpointIndex(slot_bytes, block_bytes)
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
        hashes = chain_hashes(seq.token_ids, self.block_size, seq.num_tokens // self.block_size, live.hashes)
        hit = self.index.lookup(
            seq.token_ids, hashes, self.block_size, seq.num_tokens - 1, lambda e, k: self._blocks_match(seq, e, k)
        )
        if hit is not None and self._restore(seq, hit):
            live.num_cached = hit.num_tokens
            self.num_hits += 1
            self.num_hit_tokens += hit.num_tokens
        self._plan(seq, live)
        return live.num_cached

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
        """Checkpoint the state after all computed tokens by taking ``seq.state_slot`` over (then None)."""
        live = self._live.pop(seq.seq_id, None)
        if live is None:
            return
        self._promised.difference_update(live.promised)
        decrement(self._pending, live.pending)
        if not live.ran:
            # NOTE: admitted and sent back at once (no blocks): its lookup is repeated later, counted then.
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
        """Drop every checkpoint and forget the hashes of free blocks; running sequences keep theirs."""
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
            prefix_cache_checkpoints=len(self.index),
            prefix_cache_blocks_held=len(self.index.holders),
            prefix_cache_bytes=self.index.bytes_held(),
            prefix_cache_budget_bytes=self.budget_bytes,
        )

    # ---- restore and plan --------------------------------------------------------------------

    def _blocks_match(self, seq: Sequence, entry: Checkpoint, num_full: int) -> bool:
        """The token check of a hit: ``entry``'s first ``num_full`` blocks hold ``seq``'s tokens."""
        bs = self.block_size
        return all(
            self.bm.blocks[b].token_ids == seq.token_ids[i * bs : (i + 1) * bs]
            for i, b in enumerate(entry.block_ids[:num_full])
        )

    def _restore(self, seq: Sequence, entry: Checkpoint) -> bool:
        """Share ``entry``'s full blocks, copy its partial block and states; False (nothing kept) if no block."""
        num_full, rows = divmod(entry.num_tokens, self.block_size)
        self.index.touch(entry)
        for block_id in entry.block_ids[:num_full]:
            self.bm.share(seq, block_id)
        if rows:
            self.make_room(num_blocks=1)  # NOTE: entry is the newest now, so it goes last
            if entry not in self.index or not self.bm.can_allocate(1):
                self.bm.free(seq)
                return False
            self.bm.allocate(seq, entry.num_tokens)
            # [attn_layers, rows, entry_dim]: the tokens of the block before the sequence's first new one.
            self.ops.copy_kv_rows(entry.block_ids[num_full], seq.block_table[num_full], rows)
        self.ops.copy_states([entry.slot], [seq.state_slot])
        return True

    def _plan(self, seq: Sequence, live: _Live) -> None:
        """Choose the checkpoint positions ``seq`` stops at (those nobody has or promised), and promise them."""
        bs, end, hashes = self.block_size, seq.num_tokens, live.hashes
        first = (live.num_cached // self.interval + 1) * self.interval
        wanted = set(range(first, end, self.interval)) | {end}
        shared = 0
        while shared < len(hashes) and (hashes[shared] in self.bm.hash_to_block_id or hashes[shared] in self._pending):
            shared += 1
        if live.num_cached < shared * bs < end:
            wanted.add(shared * bs)  # where seq leaves a prefix that others hold or are computing
        for pos in sorted(wanted):
            key = checkpoint_key(seq.token_ids, hashes, bs, pos)
            if key not in self._promised and self.index.get(key) is None:
                live.wanted.append(pos)
                live.promised.append(key)
                self._promised.add(key)
        live.pending = list(hashes)
        self._pending.update(live.pending)

    # ---- register, store, evict --------------------------------------------------------------

    def _register(self, seq: Sequence, live: _Live) -> None:
        """Hash the blocks of ``seq`` that became full, so that other sequences find and check them."""
        bs = self.block_size
        num_full = seq.num_computed_tokens // bs
        hashes = chain_hashes(seq.token_ids, bs, num_full, live.hashes)
        for i in range(live.num_registered, num_full):
            block_id = seq.block_table[i]
            if self.bm.blocks[block_id].hash != hashes[i]:
                self.bm.register(block_id, hashes[i], seq.token_ids[i * bs : (i + 1) * bs])
        live.num_registered = max(live.num_registered, num_full)

    def _store(self, seq: Sequence, live: _Live, pos: int, adopt: bool) -> None:
        """Checkpoint ``seq``'s states after ``pos`` computed tokens: a copy, or its slot itself (``adopt``)."""
        hashes = chain_hashes(seq.token_ids, self.block_size, pos // self.block_size, live.hashes)
        key = checkpoint_key(seq.token_ids, hashes, self.block_size, pos)
        existing = self.index.get(key)
        if existing is not None:
            if existing.num_tokens == pos and self._blocks_match(seq, existing, pos // self.block_size):
                self.index.touch(existing)
            return  # NOTE: a hash collision keeps the older entry: a miss later, never a wrong hit
        block_ids = seq.block_table[: -(-pos // self.block_size)]
        while self.index.bytes_held(block_ids) > self.budget_bytes or (not adopt and self.pool.num_free_slots == 0):
            if not self._evict_oldest():
                return
        if adopt:
            slot, seq.state_slot = seq.state_slot, None
        else:
            slot = self.pool.allocate(1)[0]
            self.ops.copy_states([seq.state_slot], [slot])
        self.bm.hold(block_ids)
        self.index.add(Checkpoint(pos, key[0], key[1], slot, list(block_ids)))
        self.num_stored += 1

    def _evict_oldest(self) -> bool:
        entry = self.index.pop_oldest()
        if entry is None:
            return False
        self.pool.free([entry.slot])
        # NOTE: tail first, as BlockManager.free: a chain's head stays longest among the free blocks.
        self.bm.release(list(reversed(entry.block_ids)))
        self.num_evicted += 1
        return True
