"""Prefix caching for hybrid models: shared KV blocks plus state checkpoints of the linear layers.

Full-attention layers reuse a prefix through its KV blocks; linear layers cannot rebuild a state
from blocks, so the cache keeps **checkpoints**: the two states of every linear layer after the
first ``p`` tokens of some sequence, in pool slots the cache owns, each with a reference on the KV
blocks that cover those ``p`` tokens. A new sequence restores the longest cached prefix of at most
all its tokens but the last (the last is computed, for logits): full blocks are shared, a partly
filled last block is copied into a fresh block (its first ``p % block_size`` rows, all attention
layers, one op) that the sequence then fills, and the states are copied into the sequence's slot
with one fused :func:`copy_slots`.

Where checkpoints are taken:

- the end of the tokens to compute (the prompt), and the release of a sequence (finish, abort,
  preemption), where its own slot is adopted, no copy: the next turn of a chat (previous prompt +
  output + new text) hits. Neither costs a forward step;
- branch points: where the sequence stops sharing full blocks with blocks already hashed or with
  the tokens of a running sequence, e.g. the end of a system prompt, as soon as a second request
  shares it (Marconi's admission rule, Pan et al., MLSys 2025: states only where reuse is seen);
- every ``checkpoint_interval`` tokens.

With ``capture_grid`` (the chunk size of the chunked delta rule, 64), interval and branch
checkpoints are **captured inside the forward**: the chunked kernel has the state at every
``capture_grid`` tokens from a sequence's first new token, so the scheduler tells a prefill which
of those positions to save into which slots (:meth:`checkpoint_slots`) and the chunk is not cut.
An interval or branch position off that grid is taken at the deepest grid position at or below
it. Without ``capture_grid`` (a kernel that cannot capture), ``clip_chunk`` ends prefill chunks at
checkpoint positions, one forward step each.

A position already cached, or promised by another running sequence, is not taken again.
Retention is by value per byte under ``budget_bytes``
(:mod:`deltaserve.kv.checkpoint_index`); whenever a sequence needs a slot or blocks
(``make_room``) the lowest-valued entries go, so running requests always win over cached ones.
Slots, blocks and the budget: :mod:`deltaserve.kv.checkpoint_store`.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch

from deltaserve.engine.sequence import Sequence
from deltaserve.kv.block_manager import BlockManager
from deltaserve.kv.checkpoint_index import PRIOR, Checkpoint, chain_hashes, checkpoint_key, decrement
from deltaserve.kv.checkpoint_store import CheckpointStore
from deltaserve.state.cache_ops import CacheOps
from deltaserve.state.pool import StatePool


@dataclass
class _Live:
    """What the cache tracks of one running sequence."""

    hashes: list[int] = field(default_factory=list)  # chained hashes of its full blocks seen so far
    num_registered: int = 0  # leading blocks of its table registered in the block manager
    wanted: list[tuple[int, str]] = field(default_factory=list)  # chunk-end checkpoints ahead: (position, kind)
    promised: list[tuple] = field(default_factory=list)  # the keys of those positions
    targets: list[tuple[int, str]] = field(default_factory=list)  # in-forward checkpoints ahead, ascending
    captures: list[Checkpoint] = field(default_factory=list)  # slots the running forward writes
    pending: list[int] = field(default_factory=list)  # its hashes counted in PrefixCache._pending
    num_cached: int = 0  # tokens restored by match
    num_loaded: int = 0  # tokens computed by another instance (a disaggregated prefill)
    ran: bool = False  # a forward has computed some of its tokens


class PrefixCache:
    """The scheduler's prefix-cache hooks (``deltaserve.engine.prefix_hooks``) for hybrid models.

    ``kv_cache``: ``[attn_layers, num_blocks, block_size, entry_dim]`` or None (no attention layers).
    ``capture_grid``: token spacing at which the forward can save states without ending a chunk
    (None: checkpoints end chunks). ``cache_ops`` makes the state and KV copies (default: on
    ``state_pool`` and ``kv_cache`` directly; under TP, rank 0's, which logs them for the other ranks).
    """

    def __init__(
        self,
        block_manager: BlockManager,
        state_pool: StatePool,
        kv_cache: torch.Tensor | None,
        *,
        checkpoint_interval: int,
        budget_bytes: int,
        capture_grid: int | None = None,
        cache_ops: CacheOps | None = None,
    ):
        if capture_grid is not None and checkpoint_interval % capture_grid:
            raise ValueError(
                f"checkpoint_interval = {checkpoint_interval} must be a multiple of {capture_grid} "
                f"(the chunk size at which the forward saves states)"
            )
        self.bm = block_manager
        self.pool = state_pool
        self.ops = cache_ops if cache_ops is not None else CacheOps(state_pool, kv_cache)
        self.store = CheckpointStore(block_manager, state_pool, kv_cache, budget_bytes, self.ops)
        self.index = self.store.index
        self.block_size = block_manager.block_size
        self.interval = checkpoint_interval
        self.grid = capture_grid
        self._pending: Counter[int] = Counter()  # block hashes of running sequences' tokens
        self._promised: set[tuple] = set()
        self._live: dict[int, _Live] = {}
        self.zero_counters()

    def zero_counters(self) -> None:
        """Hit/miss and checkpoint counters back to 0 (at start, and after the engine warm-up)."""
        self.num_queries = self.num_hits = self.num_hit_tokens = self.num_miss_tokens = self.num_captured = 0
        self.store.num_stored = self.store.num_evicted = 0

    @property
    def budget_bytes(self) -> int:
        return self.store.budget_bytes

    @budget_bytes.setter
    def budget_bytes(self, value: int) -> None:
        self.store.budget_bytes = value

    @property
    def num_stored(self) -> int:
        return self.store.num_stored

    @property
    def num_evicted(self) -> int:
        return self.store.num_evicted

    def describe(self) -> str:
        """Where checkpoints are taken and the budget, in one line (logged at start)."""
        where = (f"inside the forward every {self.interval} tokens (on the {self.grid}-token chunk grid)"
                 if self.grid else f"at chunk ends every {self.interval} tokens (one forward step each)")
        return (f"prefix caching: state checkpoints {where}, at branch points, prompt ends and request ends; "
                f"budget {self.budget_bytes / 2**20:.1f} MiB ({self.index.slot_bytes / 2**20:.2f} MiB of states "
                f"per checkpoint, {self.pool.num_slots} pool slots)")

    # ---- hooks -------------------------------------------------------------------------------

    def match(self, seq: Sequence) -> int:
        """Restore the longest cached prefix into ``seq`` (slot and blocks); returns its length."""
        live = self._live[seq.seq_id] = _Live()
        hashes = chain_hashes(seq.token_ids, self.block_size, seq.num_tokens // self.block_size, live.hashes)
        if seq.num_computed_tokens:
            # NOTE: prefilled by another instance: no lookup; its blocks get registered and its final
            # state checkpointed like any other sequence's (the next turn of a chat hits here too).
            live.num_loaded = seq.num_computed_tokens
            self._plan(seq, live)
            return seq.num_computed_tokens
        self.num_queries += 1
        hit = self.index.lookup(
            seq.token_ids, hashes, self.block_size, seq.num_tokens - 1,
            lambda e, k: self.store.blocks_match(seq.token_ids, e, k),
        )
        if hit is not None and self.store.restore(seq, hit):
            live.num_cached = hit.num_tokens
            self.num_hits += 1
            self.num_hit_tokens += hit.num_tokens
        self.num_miss_tokens += seq.num_tokens - live.num_cached
        self._plan(seq, live)
        return live.num_cached

    def clip_chunk(self, seq: Sequence, num_new_tokens: int) -> int:
        live = self._live.get(seq.seq_id)
        start = seq.num_computed_tokens
        for pos, _ in live.wanted if live is not None else ():
            if pos > start:
                return min(num_new_tokens, pos - start)
        return num_new_tokens

    def checkpoint_slots(self, seq: Sequence, num_new_tokens: int) -> list[tuple[int, int]]:
        """``(offset, slot)`` pairs: save the states after ``offset`` of this step's new tokens into ``slot``.

        Offsets are positive multiples of ``capture_grid`` below ``num_new_tokens``; the slots (and
        the blocks the checkpoints cover) are taken now and become hits after ``on_computed``.
        """
        live = self._live.get(seq.seq_id)
        if live is None or self.grid is None:
            return []
        # NOTE: captures still pending are a forward's that raised (``on_computed`` clears them):
        # nothing was written into their slots, so they go back, else the next ``on_computed`` would
        # mark them ready and the keys they hold could not be captured again.
        self._drop_captures(live)
        start, stop = seq.num_computed_tokens, seq.num_computed_tokens + num_new_tokens
        chosen: dict[int, str] = {}
        for pos, kind in live.targets:
            if pos >= stop:
                break
            grid_pos = start + (pos - start) // self.grid * self.grid  # the deepest capturable at or below
            if grid_pos > start and PRIOR[kind] >= PRIOR[chosen.get(grid_pos, "interval")]:
                chosen[grid_pos] = kind
        out = []
        for pos, kind in sorted(chosen.items()):
            entry = self.store.admit(seq, self._key(seq, live, pos), pos, kind, slot=None)
            if entry is not None:
                entry.ready = False
                live.captures.append(entry)
                out.append((pos - start, entry.slot))
        return out

    def on_computed(self, seq: Sequence) -> None:
        live = self._live.get(seq.seq_id)
        if live is None:
            return
        live.ran = True
        self._register(seq, live)
        for entry in live.captures:
            entry.ready = True
        self.num_captured += len(live.captures)
        live.captures.clear()
        computed = seq.num_computed_tokens
        while live.targets and live.targets[0][0] <= computed:
            pos, kind = live.targets.pop(0)
            if pos == computed:
                self._store(seq, live, pos, kind, adopt=False)  # the forward ended there: a copy, no step
        while live.wanted and live.wanted[0][0] <= computed:
            pos, kind = live.wanted.pop(0)
            self._promised.discard(live.promised.pop(0))
            if pos == computed:
                self._store(seq, live, pos, kind, adopt=False)

    def on_release(self, seq: Sequence) -> None:
        """Checkpoint the state after all computed tokens by taking ``seq.state_slot`` over (then None)."""
        live = self._live.pop(seq.seq_id, None)
        if live is None:
            return
        self._drop_captures(live)  # NOTE: released before its forward ran: nothing was written
        self._promised.difference_update(live.promised)
        decrement(self._pending, live.pending)
        if not live.ran and not live.num_loaded:
            # NOTE: admitted and sent back at once (no blocks): its lookup is repeated later, counted then.
            self.num_queries -= 1
            self.num_hits -= live.num_cached > 0
            self.num_hit_tokens -= live.num_cached
            self.num_miss_tokens -= seq.num_tokens - live.num_cached
        elif seq.num_computed_tokens > 0 and seq.state_slot is not None:
            self._register(seq, live)
            self._store(seq, live, seq.num_computed_tokens, "release", adopt=True)

    def make_room(self, num_slots: int = 0, num_blocks: int = 0) -> None:
        """Evict the lowest-valued checkpoints until the pools have these many free slots and blocks."""
        self.store.make_room(num_slots, num_blocks)

    def reset(self) -> None:
        """Drop every checkpoint and forget the hashes of free blocks; running sequences keep theirs."""
        while self.store.evict():
            pass
        self.bm.forget_free_hashes()

    def stats(self) -> dict:
        return dict(
            prefix_cache_queries=self.num_queries,
            prefix_cache_hits=self.num_hits,
            prefix_cache_hit_tokens=self.num_hit_tokens,
            prefix_cache_miss_tokens=self.num_miss_tokens,
            checkpoints_stored=self.num_stored,
            checkpoints_captured=self.num_captured,
            checkpoints_evicted=self.num_evicted,
            prefix_cache_checkpoints=len(self.index),
            prefix_cache_blocks_held=len(self.index.holders),
            prefix_cache_bytes=self.index.bytes_held(),
            prefix_cache_budget_bytes=self.budget_bytes,
        )

    # ---- plan, register, store ----------------------------------------------------------------

    def _plan(self, seq: Sequence, live: _Live) -> None:
        """Choose the checkpoint positions of ``seq``: chunk ends it stops at (promised), in-forward targets."""
        bs, end, hashes = self.block_size, seq.num_tokens, live.hashes
        # NOTE: with in-forward capture the interval counts from the restored prefix, whose grid the
        # forward's chunks are on; chunk ends fall anywhere, so there it counts from 0 (shared by all).
        start = max(live.num_cached, live.num_loaded)  # a prefilled sequence starts where its peer stopped
        first = start + self.interval if self.grid else (start // self.interval + 1) * self.interval
        positions = {pos: "interval" for pos in range(first, end, self.interval)}
        shared = 0
        while shared < len(hashes) and (hashes[shared] in self.bm.hash_to_block_id or hashes[shared] in self._pending):
            shared += 1
        if live.num_cached < shared * bs < end:
            positions[shared * bs] = "branch"  # where seq leaves a prefix that others hold or are computing
        if self.grid is not None:
            # NOTE: captured inside the forward at no step; which grid position is known per chunk.
            live.targets = sorted(positions.items())
            positions = {}
        positions[end] = "prompt_end"
        for pos, kind in sorted(positions.items()):
            key = checkpoint_key(seq.token_ids, hashes, bs, pos)
            if key not in self._promised and self.index.get(key) is None:
                live.wanted.append((pos, kind))
                live.promised.append(key)
                self._promised.add(key)
        live.pending = list(hashes)
        self._pending.update(live.pending)

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

    def _drop_captures(self, live: _Live) -> None:
        """Give back the slots of captures no forward wrote (they were never stored)."""
        for entry in live.captures:
            self.store.drop(entry)
        self.store.num_stored -= len(live.captures)
        live.captures.clear()

    def _key(self, seq: Sequence, live: _Live, pos: int) -> tuple:
        hashes = chain_hashes(seq.token_ids, self.block_size, pos // self.block_size, live.hashes)
        return checkpoint_key(seq.token_ids, hashes, self.block_size, pos)

    def _store(self, seq: Sequence, live: _Live, pos: int, kind: str, adopt: bool) -> None:
        """Checkpoint ``seq``'s states after ``pos`` computed tokens: a copy, or its slot itself (``adopt``)."""
        entry = self.store.admit(seq, self._key(seq, live, pos), pos, kind, slot=seq.state_slot if adopt else None)
        if entry is None:
            return
        if adopt:
            seq.state_slot = None
        else:
            self.ops.copy_states([seq.state_slot], [entry.slot])
