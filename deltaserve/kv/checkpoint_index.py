"""The prefix cache's bookkeeping: chained block hashes, checkpoint lookup, LRU order, bytes held.

Pure Python, no tensors: :class:`deltaserve.kv.prefix_cache.PrefixCache` owns the slots and blocks
and asks this index what to restore, what to evict and whether a new entry fits its budget.

A checkpoint after ``p`` tokens is keyed by ``(parent, remainder)``: ``parent`` is the chained hash
of the ``p // block_size`` full blocks before ``p`` (``ROOT_HASH`` if none), ``remainder`` the
``p % block_size`` tokens after them. Entries are grouped by ``parent``, so a lookup walks a
sequence's block hashes from the longest down and compares a few remainders at each, and every
candidate's full tokens are checked (``tokens_match``) before it is returned: a hash collision
is a miss, never a wrong hit.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from dataclasses import dataclass
from typing import Callable, Sequence

ROOT_HASH = -1  # parent hash of a sequence's first block


def block_hash(parent: int, token_ids: Sequence[int]) -> int:
    """Chained hash of one full block: it folds in the parent block's hash (``ROOT_HASH`` for block 0)."""
    return hash((parent, tuple(token_ids)))


def chain_hashes(token_ids: Sequence[int], block_size: int, num_blocks: int, hashes: list[int]) -> list[int]:
    """``hashes`` (in place) extended to the chained hashes of the first ``num_blocks`` full blocks."""
    for i in range(len(hashes), num_blocks):
        hashes.append(block_hash(hashes[-1] if hashes else ROOT_HASH, token_ids[i * block_size : (i + 1) * block_size]))
    return hashes


def checkpoint_key(token_ids: Sequence[int], hashes: list[int], block_size: int, pos: int) -> tuple:
    """``(parent, remainder)`` of the prefix ``token_ids[:pos]`` (``hashes`` covers its full blocks)."""
    k = pos // block_size
    return (hashes[k - 1] if k else ROOT_HASH), tuple(token_ids[k * block_size : pos])


@dataclass(eq=False)
class Checkpoint:
    """States after ``num_tokens`` tokens in pool ``slot``; ``block_ids`` hold tokens ``0..num_tokens-1``."""

    num_tokens: int
    parent_hash: int
    remainder: tuple[int, ...]
    slot: int
    block_ids: list[int]

    @property
    def key(self) -> tuple:
        return self.parent_hash, self.remainder


class CheckpointIndex:
    """Checkpoints by key, least recently used first, with the bytes they hold.

    ``slot_bytes``: one checkpoint's states; ``block_bytes``: one KV block (all attention layers). A
    block held by several checkpoints counts once.
    """

    def __init__(self, slot_bytes: int, block_bytes: int):
        self.slot_bytes = slot_bytes
        self.block_bytes = block_bytes
        self._by_parent: dict[int, dict[tuple[int, ...], Checkpoint]] = {}
        self._lru: OrderedDict[int, Checkpoint] = OrderedDict()  # id(entry) -> entry
        self.holders: Counter[int] = Counter()  # block id -> checkpoints holding it

    def __len__(self) -> int:
        return len(self._lru)

    def __contains__(self, entry: Checkpoint) -> bool:
        return id(entry) in self._lru

    def entries(self) -> list[Checkpoint]:
        """Least recently used first."""
        return list(self._lru.values())

    def get(self, key: tuple) -> Checkpoint | None:
        parent, remainder = key
        return self._by_parent.get(parent, {}).get(remainder)

    def lookup(
        self,
        token_ids: Sequence[int],
        hashes: list[int],
        block_size: int,
        limit: int,
        tokens_match: Callable[[Checkpoint, int], bool],
    ) -> Checkpoint | None:
        """The longest entry of ``1..limit`` tokens that is a prefix of ``token_ids``.

        ``hashes``: chained hashes of ``token_ids``' full blocks (at least ``limit // block_size``);
        ``tokens_match(entry, num_full_blocks)`` checks an entry's full blocks against ``token_ids``.
        """
        for k in range(min(len(hashes), limit // block_size), -1, -1):
            group = self._by_parent.get(hashes[k - 1] if k else ROOT_HASH)
            if not group:
                continue
            start = k * block_size
            for remainder in sorted(group, key=len, reverse=True):
                entry, end = group[remainder], start + len(remainder)
                # NOTE: num_tokens == end: with colliding hashes an entry may sit at another depth.
                if entry.num_tokens == end and 0 < end <= limit and tuple(token_ids[start:end]) == remainder:
                    if tokens_match(entry, k):
                        return entry
        return None

    def touch(self, entry: Checkpoint) -> None:
        """Make ``entry`` the most recently used."""
        self._lru.move_to_end(id(entry))

    def add(self, entry: Checkpoint) -> None:
        if self.get(entry.key) is not None:
            raise KeyError(f"a checkpoint with key {entry.key} is already cached")
        self._by_parent.setdefault(entry.parent_hash, {})[entry.remainder] = entry
        self._lru[id(entry)] = entry
        self.holders.update(set(entry.block_ids))

    def pop_oldest(self) -> Checkpoint | None:
        """Remove and return the least recently used entry (None when empty)."""
        if not self._lru:
            return None
        _, entry = self._lru.popitem(last=False)
        group = self._by_parent[entry.parent_hash]
        del group[entry.remainder]
        if not group:
            del self._by_parent[entry.parent_hash]
        decrement(self.holders, set(entry.block_ids))
        return entry

    def bytes_held(self, new_block_ids: Sequence[int] | None = None) -> int:
        """Bytes held now, or once one more entry holds ``new_block_ids`` (and a slot)."""
        num_entries, num_blocks = len(self._lru), len(self.holders)
        if new_block_ids is not None:
            num_entries += 1
            num_blocks += sum(1 for b in set(new_block_ids) if b not in self.holders)
        return num_entries * self.slot_bytes + num_blocks * self.block_bytes


def decrement(counter: Counter, keys: Sequence) -> None:
    """One count less per key (in place); keys that reach zero are dropped."""
    for key in keys:
        counter[key] -= 1
        if counter[key] <= 0:
            del counter[key]
