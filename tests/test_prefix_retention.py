"""Which checkpoints the prefix cache takes inside the forward and which it keeps (CPU, no model).

The retention rule (``deltaserve.kv.checkpoint_index``): value per byte, ``tokens * (hits + prior)``
over the bytes evicting frees, aged by a clock. The scheduling tests reuse ``test_prefix_cache``'s
fake model, whose next token is right only if every restored state is exact, with checkpoints
saved at the offsets the scheduler hands the forward (``ScheduledBatch.checkpoints``).
"""

from __future__ import annotations

from test_prefix_cache import assert_nothing_running, make_system, naive_generate, run, seq_of, tokens

from deltaserve.kv.checkpoint_index import Checkpoint, CheckpointIndex


def entry(num_tokens: int, kind: str, slot: int, blocks: list[int]) -> Checkpoint:
    return Checkpoint(num_tokens, slot, (), slot, blocks, kind)


def test_branch_points_outlive_request_ends_which_outlive_intervals_and_prompt_ends():
    index = CheckpointIndex(slot_bytes=100, block_bytes=0)
    entries = [entry(64, "interval", 1, []), entry(80, "prompt_end", 2, []), entry(90, "release", 3, []),
               entry(48, "branch", 4, [])]
    for e in entries:
        index.add(e)
    # value/100 bytes: interval 64*0.5 = 32, prompt end 80*0.25 = 20, release 90, branch 48*2 = 96
    assert [index.evict().kind for _ in entries] == ["prompt_end", "interval", "release", "branch"]


def test_a_hit_raises_an_entry_and_the_clock_lets_new_entries_displace_unused_ones():
    index = CheckpointIndex(slot_bytes=100, block_bytes=10)
    old, hit = entry(64, "interval", 1, [0, 1]), entry(64, "interval", 2, [2, 3])
    index.add(old)
    index.add(hit)
    index.touch(hit, hit=True)
    assert index.victim() is old
    assert index.evict() is old and index.clock == 64 * 0.5 / 120
    # hit: 64 * (1 + 0.5) / 120 = 0.8; a newcomer starts at the clock: an interval entry of the same
    # size (0.53) cannot displace it, a request end of 128 tokens (1.33) can.
    assert index.victim(below=index.new_priority(64, "interval", [4, 5])) is None
    assert index.victim(below=index.new_priority(128, "release", [4, 5])) is hit
    # Aging: once evictions have pushed the clock past its value, any newcomer displaces it.
    index.clock = 1.0
    assert index.victim(below=index.new_priority(8, "prompt_end", [4])) is hit


def test_pending_captures_are_never_hits_nor_evicted():
    index = CheckpointIndex(slot_bytes=100, block_bytes=0)
    pending = Checkpoint(8, -1, tuple(range(8)), 1, [], "interval", ready=False)
    index.add(pending)
    assert index.victim() is None
    assert index.lookup(list(range(12)), [], 16, 11, lambda e, k: True) is None
    pending.ready = True
    assert index.lookup(list(range(12)), [], 16, 11, lambda e, k: True) is pending


def test_in_forward_checkpoints_never_cut_a_chunk_and_restore_exactly():
    scheduler, cache, model = make_system(interval=8, capture_grid=4, max_num_batched_tokens=64)
    system = tokens(18, 100)
    first = seq_of(system + tokens(3, 101))
    run(scheduler, model, [first])
    assert [(s, n) for _, s, n in run.chunks][:1] == [(0, 21)]  # one chunk; checkpoints at 8 and 16 inside it
    assert {e.num_tokens for e in cache.index.entries()} >= {8, 16}
    later = [seq_of(system + tokens(2 + i, 102 + i)) for i in range(3)]
    assert run(scheduler, model, later) == [naive_generate(s.token_ids[: s.num_prompt_tokens], 3) for s in later]
    assert [n for _, s, n in run.chunks if s == 16] == [4, 5, 6]  # each restores 16 and computes the rest at once
    assert cache.num_captured >= 2 and cache.num_hit_tokens == 3 * 16
    assert_nothing_running(scheduler, cache)


def test_a_branch_point_off_the_grid_is_taken_at_the_deepest_grid_position_below_it():
    # Two sequences sharing 22 tokens (5 full blocks = 20) start together: the second's branch point
    # (20) lies between grid positions 16 and 24, so 16 is taken, inside the same forward.
    scheduler, cache, model = make_system(interval=1000, capture_grid=8)
    shared = tokens(22, 110)
    a, b = seq_of(shared + tokens(5, 111)), seq_of(shared + tokens(6, 112))
    run(scheduler, model, [a, b])
    assert [(s, n) for _, s, n in run.chunks][:2] == [(0, 27), (0, 28)]
    branch = [e for e in cache.index.entries() if e.kind == "branch"]
    assert [e.num_tokens for e in branch] == [16]
    c = seq_of(shared + tokens(1, 113))
    assert run(scheduler, model, [c]) == [naive_generate(c.token_ids[:23], 3)] and cache.num_hit_tokens == 16


def test_a_forward_that_raises_gives_its_capture_slots_back_and_the_retry_captures_them():
    scheduler, cache, model = make_system(interval=8, capture_grid=4, max_num_batched_tokens=64)
    system = tokens(18, 120)
    first = seq_of(system + tokens(3, 121))
    scheduler.add(first)
    failed = scheduler.schedule()
    assert [off for off, _ in failed.checkpoints[0]] == [8, 16]
    used = scheduler.state_pool.num_used_slots
    # NOTE: the forward of ``failed`` raised: neither run nor postprocessed; the sequence runs again.
    retry = scheduler.schedule()
    assert [off for off, _ in retry.checkpoints[0]] == [8, 16]
    assert scheduler.state_pool.num_used_slots == used  # the first step's two slots went back
    assert cache.num_stored == 2
    scheduler.postprocess(retry, model.run(retry))
    run(scheduler, model, [])
    later = seq_of(system + tokens(2, 122))
    assert run(scheduler, model, [later]) == [naive_generate(later.token_ids[:20], 3)]
    assert cache.num_hit_tokens == 16
    assert_nothing_running(scheduler, cache)
