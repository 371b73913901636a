"""The prefix cache's bookkeeping: chained block hashes, checkpoint lookup, retention, bytes held.

Pure Python, no tensors: :class:`deltaserve.kv.prefix_cache.PrefixCache` owns the slots and blocks
and asks this index what to restore, what to evict and whether a new entry fits its budget.

Retention is by value per byte (GreedyDual-Size-Frequency, the rule of web caches with objects of
unequal size; Marconi, Pan et al., MLSys 2025, ranks hybrid-model states by FLOPs saved per byte
the same way): an entry's priority is ``clock + tokens * (hits + prior) / bytes``, where ``tokens``
is what a hit saves, ``bytes`` what evicting it frees (its slot and the blocks no other entry
holds), and ``prior`` how likely a first reuse is from where the entry was taken (``PRIOR``):

- a branch point (2): a second sequence was seen sharing that prefix, so more are likely (a
  system prompt), and it is the deepest state they can all restore;
- a request's end (1): the next turn of a chat continues exactly there;
- an interval checkpoint (0.5): taken in case a prefix is seen again; the deepest one below a
  prefix that turns out shared is what its later users restore, and its hits then raise it;
- a prompt's end (0.25): a request continuing the conversation hits the request's end instead,
  so only a repeat of the same prompt uses it.

The lowest priority goes first; ``clock`` becomes the evicted priority, so entries not used for a
while age out whatever their value.
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


# NOTE: how likely a first reuse is, by where a checkpoint was taken (see the module docstring).
PRIOR = {"branch": 2.0, "release": 1.0, "interval": 0.5, "prompt_end": 0.25}


@dataclass(eq=False)
class Checkpoint:
    """States after ``num_tokens`` tokens in pool ``slot``; ``block_ids`` hold tokens ``0..num_tokens-1``.

    ``ready`` is False while a forward is still to write the states (an in-forward capture): such an
    entry is neither found nor evicted.
    """

    num_tokens: int
    parent_hash: int
    remainder: tuple[int, ...]
    slot: int
    block_ids: list[int]
    kind: str = "interval"
    ready: bool = True
    hits: int = 0
    credit: float = 0.0  # the index's clock when the entry was added or last hit

    @property
    def key(self) -> tuple:
        return self.parent_hash, self.remainder


class CheckpointIndex:
    """Checkpoints by key, in insertion order, with their retention priority and the bytes they hold.

    ``slot_bytes``: one checkpoint's states; ``block_bytes``: one KV block (all attention layers). A
    block held by several checkpoints counts once.
    """

    def __init__(self, slot_bytes: int, block_bytes: int):
        self.slot_bytes = slot_bytes
        self.block_bytes = block_bytes
        self._by_parent: dict[int, dict[tuple[int, ...], Checkpoint]] = {}
        self._lru: OrderedDict[int, Checkpoint] = OrderedDict()  # id(entry) -> entry, least recently used first
        self.holders: Counter[int] = Counter()  # block id -> checkpoints holding it
        self.clock = 0.0

    def __len__(self) -> int:
        return len(self._lru)

    def __contains__(self, entry: Checkpoint) -> bool:
        return id(entry) in self._lru

    def entries(self) -> list[Checkpoint]:
        """Least recently used first."""
        return list(self._lru.values())

    def freed_bytes(self, entry: Checkpoint) -> int:
        """What evicting ``entry`` gives back: its slot and the blocks only it holds."""
        return self.slot_bytes + self.block_bytes * sum(1 for b in set(entry.block_ids) if self.holders[b] == 1)

    def priority(self, entry: Checkpoint) -> float:
        return entry.credit + entry.num_tokens * (entry.hits + PRIOR[entry.kind]) / max(1, self.freed_bytes(entry))

    def new_priority(self, num_tokens: int, kind: str, block_ids: Sequence[int]) -> float:
        """The priority an entry would have if added now (its blocks not held by others count as its own)."""
        own = sum(1 for b in set(block_ids) if self.holders[b] == 0)
        return self.clock + num_tokens * PRIOR[kind] / max(1, self.slot_bytes + self.block_bytes * own)

    def victim(self, below: float = float("inf")) -> Checkpoint | None:
        """The ready entry of lowest priority if it is at most ``below`` (least recently used on ties), else None."""
        best, best_priority = None, below
        for entry in self._lru.values():
            # NOTE: <= below: on a tie the newcomer wins (recency); < best: the least recently used of equals.
            if entry.ready and (p := self.priority(entry)) <= below and (best is None or p < best_priority):
                best, best_priority = entry, p
        return best

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
                # NOTE: num_tokens == end: with colliding hashes an entry may sit at another depth;
                # an in-forward capture not yet written (not ``ready``) is never a hit.
                if not entry.ready or entry.num_tokens != end or not 0 < end <= limit:
                    continue
                if tuple(token_ids[start:end]) == remainder:
                    if tokens_match(entry, k):
                        return entry
        return None

    def touch(self, entry: Checkpoint, hit: bool = False) -> None:
        """Make ``entry`` the most recently used (and count a hit): its credit restarts at the clock."""
        self._lru.move_to_end(id(entry))
        entry.hits += hit
        entry.credit = self.clock

    def add(self, entry: Checkpoint) -> None:
        if self.get(entry.key) is not None:
            raise KeyError(f"a checkpoint with key {entry.key} is already cached")
        self._by_parent.setdefault(entry.parent_hash, {})[entry.remainder] = entry
        entry.credit = self.clock
        self._lru[id(entry)] = entry
        self.holders.update(set(entry.block_ids))

    def pop_oldest(self) -> Checkpoint | None:
        """Remove and return the least recently used entry (None when empty)."""
        if not self._lru:
            return None
        return self.remove(next(iter(self._lru.values())))

    def evict(self, below: float = float("inf")) -> Checkpoint | None:
        """Remove and return :meth:`victim` (None if none is at most ``below``); the clock moves to its priority."""
        entry = self.victim(below)
        if entry is not None:
            self.clock = max(self.clock, self.priority(entry))
            self.remove(entry)
        return entry

    def remove(self, entry: Checkpoint) -> Checkpoint:
        del self._lru[id(entry)]
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
