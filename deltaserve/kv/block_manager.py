"""Paged KV blocks of the full-attention (MLA) layers: a free list and a block table per sequence.

Block ``b`` holds the KV entries of token positions ``b_index * block_size ..`` of the sequence
whose table lists it at ``b_index``; token ``pos`` lives at flat slot
``block_table[pos // block_size] * block_size + pos % block_size`` (vLLM's ``slot_mapping``).

Prefix caching builds on this without changing the engine: blocks carry a ref count, a chained
hash and their tokens; a full block may be shared by several tables (``share``); a freed block
keeps its hash until it is handed out again (lazy eviction, oldest freed first).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Protocol


class HasBlockTable(Protocol):
    block_table: list[int]


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    # NOTE: -1 = not registered in a prefix cache; the prefix cache sets hash and token_ids once
    # the block is full, and checks token_ids on every hit against hash collisions.
    hash: int = -1
    token_ids: list[int] = field(default_factory=list)

    def reset(self) -> None:
        self.ref_count = 1
        self.hash = -1
        self.token_ids = []


class BlockManager:
    """Hands out KV blocks to sequences as their token counts grow, and takes them back."""

    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1:
            raise ValueError(f"num_kv_blocks must be >= 1, got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_block_ids: deque[int] = deque(range(num_blocks))
        self.used_block_ids: set[int] = set()
        # Filled by a prefix cache: hash -> block id of a full, registered block (used or freed).
        self.hash_to_block_id: dict[int, int] = {}

    # ---- counters ----------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_block_ids)

    @property
    def num_used_blocks(self) -> int:
        return len(self.used_block_ids)

    def num_blocks_for(self, num_tokens: int) -> int:
        """Blocks that hold ``num_tokens`` tokens."""
        return -(-num_tokens // self.block_size)

    def num_new_blocks(self, seq: HasBlockTable, num_tokens: int) -> int:
        """Blocks ``seq`` must gain so that its table covers ``num_tokens`` tokens."""
        return max(0, self.num_blocks_for(num_tokens) - len(seq.block_table))

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= len(self.free_block_ids)

    # ---- allocation --------------------------------------------------------------------------

    def allocate(self, seq: HasBlockTable, num_tokens: int) -> None:
        """Grow ``seq.block_table`` (in place) to cover ``num_tokens`` tokens; all or nothing."""
        need = self.num_new_blocks(seq, num_tokens)
        if need > len(self.free_block_ids):
            raise RuntimeError(
                f"KV cache has {len(self.free_block_ids)} free blocks of {self.num_blocks}, {need} requested"
            )
        for _ in range(need):
            seq.block_table.append(self._take_free_block())

    def share(self, seq: HasBlockTable, block_id: int) -> None:
        """Append a block already held elsewhere (a prefix-cache hit) to ``seq``'s table."""
        block = self.blocks[block_id]
        if block.ref_count == 0:
            # A freed block that still holds its hashed content: take it back from the free list.
            self.free_block_ids.remove(block_id)
            self.used_block_ids.add(block_id)
        block.ref_count += 1
        seq.block_table.append(block_id)

    def hold(self, block_ids: list[int]) -> None:
        """Take one more reference on blocks that are in use (a prefix-cache checkpoint keeps them)."""
        for block_id in block_ids:
            block = self.blocks[block_id]
            if block.ref_count <= 0:
                raise RuntimeError(f"KV block {block_id} is free; only a block in use can be held")
            block.ref_count += 1

    def release(self, block_ids: list[int]) -> None:
        """Drop one reference per block (in the given order); a block nobody holds goes to the free list."""
        for block_id in block_ids:
            block = self.blocks[block_id]
            if block.ref_count <= 0:
                raise RuntimeError(f"KV block {block_id} is freed twice (ref_count {block.ref_count})")
            block.ref_count -= 1
            if block.ref_count == 0:
                self.used_block_ids.remove(block_id)
                self.free_block_ids.append(block_id)

    def register(self, block_id: int, block_hash: int, token_ids: list[int]) -> None:
        """Mark a full block as holding ``token_ids`` under the chained hash ``block_hash``."""
        block = self.blocks[block_id]
        block.hash = block_hash
        block.token_ids = list(token_ids)
        self.hash_to_block_id[block_hash] = block_id

    def forget_free_hashes(self) -> None:
        """Drop the hashes of every free block (a prefix-cache reset): they can no longer be found."""
        for block_id in self.free_block_ids:
            block = self.blocks[block_id]
            block.hash, block.token_ids = -1, []
        self.hash_to_block_id = {h: b for h, b in self.hash_to_block_id.items() if self.blocks[b].hash == h}

    def free(self, seq: HasBlockTable) -> None:
        """Release every block of ``seq`` and empty its table (in place)."""
        # NOTE: the tail first, so that the head of a chain (the likelier prefix hit) stays longest.
        self.release(list(reversed(seq.block_table)))
        seq.block_table.clear()

    def _take_free_block(self) -> int:
        block_id = self.free_block_ids.popleft()
        block = self.blocks[block_id]
        if block.hash != -1 and self.hash_to_block_id.get(block.hash) == block_id:
            # Lazy eviction: the cached content is overwritten from now on.
            del self.hash_to_block_id[block.hash]
        block.reset()
        self.used_block_ids.add(block_id)
        return block_id
