"""Prefix cache logic on the CPU without a model: hash chain, token check, LRU, ref counts, scheduling.

``FakeModel`` runs a batch on the real state pool and KV tensor: a sequence's recurrent state is a
running hash of its tokens and its conv state the last ``K - 1`` tokens; every KV entry it writes is
``(token, position)``, and every forward first reads all earlier entries through the block table.
The next token mixes the state, the conv window and the KV entries, so it equals ``naive_next`` (a
from-scratch loop over the history) only if restored states and shared or copied blocks are exact.
"""

from __future__ import annotations

import pytest
import torch

from deltaserve.engine.sampling_params import SamplingParams
from deltaserve.engine.scheduler import Scheduler
from deltaserve.engine.sequence import Sequence
from deltaserve.kv import checkpoint_index
from deltaserve.kv.block_manager import BlockManager
from deltaserve.kv.checkpoint_index import Checkpoint, CheckpointIndex, chain_hashes
from deltaserve.kv.prefix_cache import PrefixCache
from deltaserve.state.layout import kda_layout
from deltaserve.state.pool import StateGroup, StatePool

VOCAB, MOD = 97, 65521


def naive_next(history: list[int]) -> int:
    h = 0
    for t in history:
        h = (h * 31 + t + 1) % MOD
    window = ([0, 0, 0] + history)[-3:]
    kv = sum(t * (pos + 1) for pos, t in enumerate(history))
    return int(h + sum(w * (i + 1) for i, w in enumerate(window)) + kv) % VOCAB


def naive_generate(prompt: list[int], max_tokens: int) -> list[int]:
    history = list(prompt)
    for _ in range(max_tokens):
        history.append(naive_next(history))
    return history[len(prompt) :]


class FakeModel:
    def __init__(self, pool: StatePool, kv_cache: torch.Tensor, block_size: int):
        self.pool, self.kv, self.bs = pool, kv_cache, block_size

    def entry(self, seq: Sequence, pos: int) -> torch.Tensor:
        return self.kv[0, seq.block_table[pos // self.bs], pos % self.bs]

    def save(self, slot: int, h: int, window: list[int]) -> None:
        recurrent, conv = self.pool.recurrent["kda"][0, slot].view(-1), self.pool.conv["kda"][0, slot]
        recurrent.fill_(0)
        recurrent[0] = h
        conv.fill_(0)
        conv[:, 0] = torch.tensor(window, dtype=conv.dtype)

    def run(self, batch) -> list:
        out = []
        checkpoints = batch.checkpoints or [[] for _ in batch.seqs]
        for seq, n, sample, cuts in zip(batch.seqs, batch.num_new_tokens, batch.do_sample, checkpoints):
            start = seq.num_computed_tokens
            recurrent = self.pool.recurrent["kda"][0, seq.state_slot].view(-1)
            conv = self.pool.conv["kda"][0, seq.state_slot]  # [3, dim] (SD), newest last
            for pos in range(start):
                assert self.entry(seq, pos).tolist() == [seq.token_ids[pos], pos], f"KV of {pos} is wrong"
            h = int(recurrent[0]) if start else 0
            window = [int(v) for v in conv[:, 0]] if start else [0, 0, 0]
            saves = {start + offset: slot for offset, slot in cuts}  # in-forward checkpoints
            for pos in range(start, start + n):
                if pos in saves:
                    self.save(saves[pos], h, window)
                t = seq.token_ids[pos]
                h = (h * 31 + t + 1) % MOD
                window = window[1:] + [t]
                self.entry(seq, pos).copy_(torch.tensor([t, pos], dtype=torch.float32))
            self.save(seq.state_slot, h, window)
            kv = sum(int(self.entry(seq, p)[0]) * (p + 1) for p in range(start + n))
            token = int(h + sum(w * (i + 1) for i, w in enumerate(window)) + kv) % VOCAB
            out.append((token, 0.0, None) if sample else None)
        return out


def stop_at_length(seq: Sequence) -> None:
    if seq.num_output_tokens >= seq.max_tokens:
        seq.finish_reason = "length"


def make_system(*, num_slots=16, num_blocks=64, block_size=4, interval=8, budget=1 << 30, max_num_seqs=4,
                max_num_batched_tokens=64, capture_grid=None):
    pool = StatePool({"kda": StateGroup(kda_layout(1, 2, model_dtype=torch.float32), 1)}, num_slots)
    for tensor in (pool.conv["kda"], pool.recurrent["kda"]):
        tensor.fill_(float("nan"))  # NOTE: a slot read before it was written or restored shows up as NaN
    kv_cache = torch.full((1, num_blocks, block_size, 2), float("nan"))
    manager = BlockManager(num_blocks, block_size)
    cache = PrefixCache(manager, pool, kv_cache, checkpoint_interval=interval, budget_bytes=budget,
                        capture_grid=capture_grid)
    scheduler = Scheduler(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens, state_pool=pool,
                          block_manager=manager, check_stop=stop_at_length, prefix_cache=cache)
    return scheduler, cache, FakeModel(pool, kv_cache, block_size)


_ids = iter(range(10**9))


def seq_of(prompt: list[int], max_tokens: int = 3) -> Sequence:
    seq_id = next(_ids)
    return Sequence(seq_id, f"r{seq_id}", 0, prompt, SamplingParams(), max_tokens)


def run(scheduler: Scheduler, model: FakeModel, seqs: list[Sequence]) -> list[list[int]]:
    """Add ``seqs``, run to completion, return their outputs; every chunk is logged in ``run.chunks``."""
    run.chunks = []
    for seq in seqs:
        scheduler.add(seq)
    for _ in range(10_000):
        if not scheduler.has_unfinished():
            return [seq.output_token_ids for seq in seqs]
        batch = scheduler.schedule()
        assert batch.seqs, "nothing scheduled while work is pending"
        run.chunks += [(s.seq_id, s.num_computed_tokens, n) for s, n in zip(batch.seqs, batch.num_new_tokens)]
        scheduler.postprocess(batch, model.run(batch))
    raise AssertionError("did not finish")


def tokens(n: int, seed: int) -> list[int]:
    return [(seed * 7919 + 13 * i + i * i) % VOCAB for i in range(n)]


def assert_nothing_running(scheduler: Scheduler, cache: PrefixCache) -> None:
    """Whatever is still used is exactly the cache's: its slots, and the blocks its entries reference."""
    entries = cache.index.entries()
    assert scheduler.state_pool.num_used_slots == len(entries)
    held = {b for e in entries for b in e.block_ids}
    assert scheduler.block_manager.used_block_ids == held
    for b in held:
        assert scheduler.block_manager.blocks[b].ref_count == sum(e.block_ids.count(b) for e in entries)
    cache.reset()
    assert scheduler.state_pool.num_used_slots == 0 and scheduler.block_manager.num_used_blocks == 0


# ---- hashing and the index ---------------------------------------------------------------------

def test_chain_hash_of_a_block_depends_on_every_earlier_block():
    a = tokens(16, 1)
    b = list(a)
    b[1] += 1  # block 0 differs
    c = a[:12] + [t + 1 for t in a[12:]]  # only block 3 differs
    ha, hb, hc = (chain_hashes(x, 4, 4, []) for x in (a, b, c))
    assert all(x != y for x, y in zip(ha, hb))
    assert ha[:3] == hc[:3] and ha[3] != hc[3]
    assert chain_hashes(a, 4, 4, ha[:2]) == ha  # extends a partial chain


def test_index_evicts_least_recently_used_first_and_counts_shared_blocks_once():
    index = CheckpointIndex(slot_bytes=100, block_bytes=10)
    first, second, third = (Checkpoint(4, i, (), i + 1, [0, i + 1]) for i in range(3))
    for entry in (first, second, third):
        index.add(entry)
    assert index.bytes_held() == 3 * 100 + 4 * 10  # block 0 is held by all three
    assert index.bytes_held([0, 7]) == 4 * 100 + 5 * 10
    index.touch(first)
    assert [index.pop_oldest(), index.pop_oldest(), index.pop_oldest(), index.pop_oldest()] == [
        second, third, first, None]
    assert index.bytes_held() == 0 and not index.holders


# ---- hits --------------------------------------------------------------------------------------

def test_hit_shares_full_blocks_copies_the_partial_block_and_restores_states():
    scheduler, cache, model = make_system(interval=100)
    prompt = tokens(13, 2)
    first = seq_of(prompt)
    assert run(scheduler, model, [first]) == [naive_generate(prompt, 3)]
    # The end-of-prompt checkpoint at 13 = 3 full blocks + 1 row.
    entry = next(e for e in cache.index.entries() if e.num_tokens == 13)
    second = seq_of(prompt + tokens(5, 3))
    scheduler.add(second)
    batch = scheduler.schedule()
    assert second.num_computed_tokens == 13 and batch.num_new_tokens == [5]
    assert second.block_table[:3] == entry.block_ids[:3]
    assert second.block_table[3] != entry.block_ids[3]  # a fresh copy of the partial block
    assert all(scheduler.block_manager.blocks[b].ref_count >= 2 for b in entry.block_ids[:3])
    assert model.entry(second, 12).tolist() == [prompt[12], 12]
    scheduler.postprocess(batch, model.run(batch))
    assert run(scheduler, model, []) == []
    assert second.output_token_ids == naive_generate(second.token_ids[:18], 3)
    assert cache.num_hits == 1 and cache.num_hit_tokens == 13


def test_identical_prompt_hits_all_but_its_last_token():
    scheduler, cache, model = make_system(interval=4)
    prompt = tokens(12, 4)
    run(scheduler, model, [seq_of(prompt)])
    again = seq_of(prompt)
    assert run(scheduler, model, [again]) == [naive_generate(prompt, 3)]
    # Checkpoints at 4 and 8 (interval) and 12 (end): the last token is always computed, so 8.
    assert cache.num_hit_tokens == 8


@pytest.mark.parametrize("where", ["same_depth", "other_depth"])
def test_hash_collision_is_caught_by_the_token_check(monkeypatch, where):
    monkeypatch.setattr(checkpoint_index, "block_hash", lambda parent, token_ids: 7)
    scheduler, cache, model = make_system(interval=100)
    a = tokens(10, 5)
    run(scheduler, model, [seq_of(a, max_tokens=1)])
    (entry,) = cache.index.entries()
    assert (entry.num_tokens, entry.key) == (10, (7, tuple(a[8:10])))
    b = tokens(14, 6)
    if where == "same_depth":
        b[8:10] = a[8:10]  # key (7, a[8:10]) at 10 tokens, but blocks 0 and 1 differ
    else:
        b[:4], b[4:6] = a[:4], a[8:10]  # key (7, a[8:10]) at 6 tokens, block 0 equal
    assert run(scheduler, model, [seq_of(b)]) == [naive_generate(b, 3)]
    assert cache.num_hit_tokens == 0


def test_lru_entry_goes_first_when_the_budget_is_full():
    scheduler, cache, model = make_system(interval=100)
    slot_bytes, block_bytes = cache.index.slot_bytes, cache.index.block_bytes
    # Room for two checkpoints of a 6-token prompt (two blocks each) and their end-of-request twins.
    cache.budget_bytes = 2 * (slot_bytes + 2 * block_bytes) + 2 * (slot_bytes + block_bytes)
    prompts = [tokens(6, s) for s in (7, 8, 9)]
    for prompt in prompts[:2]:
        run(scheduler, model, [seq_of(prompt, max_tokens=1)])
    assert {e.num_tokens for e in cache.index.entries()} == {6}
    run(scheduler, model, [seq_of(prompts[0] + [1], max_tokens=1)])  # a hit touches prompt 0's entry
    run(scheduler, model, [seq_of(prompts[2], max_tokens=1)])
    cached = [list(e.remainder) for e in cache.index.entries()]
    assert prompts[1][4:6] not in cached and prompts[0][4:6] in cached and prompts[2][4:6] in cached
    assert cache.index.bytes_held() <= cache.budget_bytes


def test_ref_counts_count_every_holder_and_reset_frees_everything():
    scheduler, cache, model = make_system(interval=4)
    prompt = tokens(10, 10)
    run(scheduler, model, [seq_of(prompt)])
    a, b = seq_of(prompt + [1, 2]), seq_of(prompt + [3])
    scheduler.add(a)
    scheduler.add(b)
    batch = scheduler.schedule()
    shared = a.block_table[0]
    holders = sum(shared in e.block_ids for e in cache.index.entries())
    assert b.block_table[0] == shared and scheduler.block_manager.blocks[shared].ref_count == holders + 2
    scheduler.postprocess(batch, model.run(batch))
    run(scheduler, model, [])
    assert_nothing_running(scheduler, cache)


# ---- scheduling ----------------------------------------------------------------------------------

def test_chunks_end_at_new_checkpoint_positions_only():
    scheduler, cache, model = make_system(interval=8)
    prompt = tokens(20, 11)
    first, twin = seq_of(prompt + [5]), seq_of(prompt + [6])
    run(scheduler, model, [first, twin])
    # first is cut at 8 and 16; its twin, admitted in the same step, finds those promised and is
    # cut only where it leaves first's blocks (20 = 5 full blocks).
    assert [(s, n) for i, s, n in run.chunks if i == first.seq_id][:3] == [(0, 8), (8, 8), (16, 5)]
    assert [(s, n) for i, s, n in run.chunks if i == twin.seq_id][:2] == [(0, 20), (20, 1)]
    assert first.output_token_ids == naive_generate(first.token_ids[:21], 3)


def test_without_interval_checkpoints_only_a_shared_prefix_cuts_a_chunk():
    # The engine's default interval is the chunk size: prompts that fit one chunk are cut only where
    # they leave a prefix seen before (a branch point), and then only once for everybody.
    scheduler, cache, model = make_system(interval=1000)
    system = tokens(18, 90)
    first, second, third = (seq_of(system + tokens(3, 91 + i)) for i in range(3))
    unique = seq_of(tokens(21, 95))
    run(scheduler, model, [first, unique])
    assert [n for _, s, n in run.chunks if s == 0] == [21, 21]  # one chunk each: no cut without sharing
    run(scheduler, model, [second])
    assert [(s, n) for _, s, n in run.chunks][:2] == [(0, 16), (16, 5)]  # 16 = the 4 full blocks of system
    run(scheduler, model, [third])
    assert cache.num_hit_tokens == 16 and [(s, n) for _, s, n in run.chunks][0] == (16, 5)
    assert third.output_token_ids == naive_generate(third.token_ids[:21], 3)


@pytest.mark.parametrize("num_slots, num_blocks", [(4, 64), (6, 14), (3, 12)])
def test_workloads_with_tight_pools_match_the_naive_loop(num_slots, num_blocks):
    scheduler, cache, model = make_system(num_slots=num_slots, num_blocks=num_blocks, max_num_seqs=3,
                                          max_num_batched_tokens=12)
    system = tokens(11, 12)
    prompts = [system + tokens(1 + i % 5, 20 + i) for i in range(10)]
    prompts += [prompts[0][:7] + tokens(3, 40), prompts[1][:13]]  # diverge mid-block, mid-interval
    seqs = [seq_of(p, max_tokens=2 + i % 4) for i, p in enumerate(prompts)]
    assert run(scheduler, model, seqs) == [naive_generate(p, s.max_tokens) for p, s in zip(prompts, seqs)]
    chat = tokens(9, 50)
    for turn in range(3):
        (out,) = run(scheduler, model, [seq_of(chat, max_tokens=3)])
        assert out == naive_generate(chat, 3)
        chat = chat + out + tokens(2 + turn, 60 + turn)
    assert cache.num_hits > 0 and cache.num_evicted > 0
    assert_nothing_running(scheduler, cache)


def test_requests_take_slots_from_the_cache_when_none_is_free():
    scheduler, cache, model = make_system(num_slots=2, max_num_seqs=2, interval=4)
    prompts = [tokens(9, 70 + i) for i in range(6)]
    assert run(scheduler, model, [seq_of(p) for p in prompts]) == [naive_generate(p, 3) for p in prompts]
    # Checkpoints gave their slots up: no request ever waited for one.
    assert cache.num_evicted > 0 and scheduler.num_slot_waits == 0
    assert_nothing_running(scheduler, cache)


def test_preempted_sequence_recomputes_from_its_own_checkpoint():
    scheduler, cache, model = make_system(num_blocks=7, max_num_seqs=2, interval=100)
    old, new = seq_of(tokens(9, 80), max_tokens=8), seq_of(tokens(9, 81), max_tokens=8)
    assert run(scheduler, model, [old, new]) == [naive_generate(old.token_ids[:9], 8),
                                                 naive_generate(new.token_ids[:9], 8)]
    assert scheduler.num_preemptions > 0 and cache.num_hits > 0
    assert_nothing_running(scheduler, cache)
