"""Paged KV block manager: tables grow with tokens, blocks return to the free list, no sharing by accident."""

from __future__ import annotations

import pytest

from deltaserve.kv.block_manager import BlockManager


class Seq:
    def __init__(self):
        self.block_table: list[int] = []


def test_table_covers_tokens_as_they_grow():
    manager = BlockManager(num_blocks=8, block_size=4)
    seq = Seq()
    for num_tokens, blocks in [(1, 1), (4, 1), (5, 2), (12, 3), (13, 4)]:
        manager.allocate(seq, num_tokens)
        assert len(seq.block_table) == blocks
    assert manager.num_used_blocks == 4 and manager.num_free_blocks == 4


def test_slot_mapping_of_two_sequences_never_collides():
    manager = BlockManager(num_blocks=10, block_size=3)
    a, b = Seq(), Seq()
    for n in range(1, 13):  # interleaved growth
        manager.allocate(a, n)
        manager.allocate(b, n + 2)
    slots = set()
    for seq, length in ((a, 12), (b, 14)):
        for pos in range(length):
            slots.add(seq.block_table[pos // 3] * 3 + pos % 3)
    assert len(slots) == 26


def test_free_returns_every_block_and_empties_the_table():
    manager = BlockManager(num_blocks=6, block_size=2)
    seqs = [Seq() for _ in range(3)]
    for seq in seqs:
        manager.allocate(seq, 4)
    assert manager.num_free_blocks == 0
    for seq in seqs:
        manager.free(seq)
        assert seq.block_table == []
    assert manager.num_free_blocks == 6 and manager.num_used_blocks == 0


def test_allocate_beyond_free_blocks_fails_and_changes_nothing():
    manager = BlockManager(num_blocks=3, block_size=2)
    seq = Seq()
    manager.allocate(seq, 2)
    with pytest.raises(RuntimeError, match="2 free blocks of 3, 3 requested"):
        manager.allocate(seq, 8)
    assert len(seq.block_table) == 1 and manager.num_free_blocks == 2
    assert manager.can_allocate(2) and not manager.can_allocate(3)


def test_shared_block_is_freed_only_by_its_last_holder():
    manager = BlockManager(num_blocks=4, block_size=2)
    a, b = Seq(), Seq()
    manager.allocate(a, 4)
    manager.share(b, a.block_table[0])
    assert manager.blocks[a.block_table[0]].ref_count == 2
    manager.free(a)
    assert manager.num_used_blocks == 1  # still held by b
    manager.free(b)
    assert manager.num_used_blocks == 0 and manager.num_free_blocks == 4


def test_double_free_is_an_error():
    manager = BlockManager(num_blocks=2, block_size=2)
    a = Seq()
    manager.allocate(a, 2)
    table = list(a.block_table)
    manager.free(a)
    a.block_table = table
    with pytest.raises(RuntimeError, match="freed twice"):
        manager.free(a)


def test_rejects_empty_cache():
    with pytest.raises(ValueError, match="num_kv_blocks must be >= 1"):
        BlockManager(num_blocks=0, block_size=16)
