"""Scheduler without a model: a fake runner checks what each forward would see.

The fake model keeps, per state slot, the tokens the slot has consumed, and per KV position the
(sequence, position, token) written there; its next token is a hash of the whole history. So a
sequence gets the tokens of a naive unbatched loop only if chunks, decodes, preemption and
recompute feed exactly the right tokens to the right slot and blocks.
"""

from __future__ import annotations

import torch

from deltaserve.engine.sampling_params import SamplingParams
from deltaserve.engine.scheduler import Scheduler
from deltaserve.engine.sequence import Sequence
from deltaserve.kv.block_manager import BlockManager
from deltaserve.state.layout import kda_layout
from deltaserve.state.pool import StateGroup, StatePool

VOCAB = 97


def next_token(history: list[int]) -> int:
    return sum((i + 1) * t for i, t in enumerate(history)) * 31 % VOCAB


def naive_generate(prompt: list[int], max_tokens: int) -> list[int]:
    history = list(prompt)
    for _ in range(max_tokens):
        history.append(next_token(history))
    return history[len(prompt) :]


def stop_at_length(seq: Sequence) -> None:
    if seq.num_output_tokens >= seq.max_tokens:
        seq.finish_reason = "length"


class FakeRunner:
    def __init__(self, block_size: int):
        self.block_size = block_size
        self.slot_history: dict[int, list[int]] = {}
        self.kv: dict[int, tuple[int, int, int]] = {}

    def flat(self, seq: Sequence, pos: int) -> int:
        return seq.block_table[pos // self.block_size] * self.block_size + pos % self.block_size

    def run(self, batch):
        out = []
        assert len({seq.state_slot for seq in batch.seqs}) == len(batch.seqs), "two sequences share a slot"
        for seq, n, sample in zip(batch.seqs, batch.num_new_tokens, batch.do_sample):
            start = seq.num_computed_tokens
            assert n >= 1 and start + n <= seq.num_tokens
            assert len(seq.block_table) * self.block_size >= start + n, "blocks do not cover the new tokens"
            history = [] if start == 0 else self.slot_history[seq.state_slot]
            assert history == seq.token_ids[:start], "slot does not hold the computed prefix"
            for pos in range(start):
                assert self.kv[self.flat(seq, pos)] == (seq.seq_id, pos, seq.token_ids[pos]), "KV overwritten"
            for pos in range(start, start + n):
                self.kv[self.flat(seq, pos)] = (seq.seq_id, pos, seq.token_ids[pos])
            history = history + seq.token_ids[start : start + n]
            self.slot_history[seq.state_slot] = history
            out.append((next_token(history), 0.0, None) if sample else None)
        return out


def make_scheduler(*, num_slots=8, num_blocks=64, block_size=4, max_num_seqs=8, budget=32) -> Scheduler:
    layout = kda_layout(1, 2, model_dtype=torch.float32)
    return Scheduler(
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=budget,
        state_pool=StatePool({"kda": StateGroup(layout, 1)}, num_slots),
        block_manager=BlockManager(num_blocks, block_size),
        check_stop=stop_at_length,
    )


def make_seqs(lengths_and_outputs: list[tuple[int, int]], first_id: int = 0) -> list[Sequence]:
    seqs = []
    for i, (prompt_len, max_tokens) in enumerate(lengths_and_outputs):
        prompt = [(7 * (first_id + i) + 3 * j) % VOCAB for j in range(prompt_len)]
        seqs.append(Sequence(first_id + i, f"r{first_id + i}", 0, prompt, SamplingParams(), max_tokens))
    return seqs


def run_to_completion(scheduler: Scheduler, runner: FakeRunner, max_steps: int = 10_000) -> list:
    batches = []
    for _ in range(max_steps):
        if not scheduler.has_unfinished():
            return batches
        batch = scheduler.schedule()
        assert batch.seqs, "nothing scheduled while work is pending"
        batches.append([(s.seq_id, n, p) for s, n, p in zip(batch.seqs, batch.num_new_tokens, batch.is_prefill)])
        scheduler.postprocess(batch, runner.run(batch))
    raise AssertionError("did not finish")


def assert_all_free(scheduler: Scheduler) -> None:
    assert scheduler.state_pool.num_used_slots == 0
    assert scheduler.state_pool.num_free_slots == scheduler.state_pool.num_slots
    assert scheduler.block_manager.num_used_blocks == 0
    assert scheduler.block_manager.num_free_blocks == scheduler.block_manager.num_blocks


def assert_naive_tokens(seqs: list[Sequence]) -> None:
    for seq in seqs:
        assert seq.finish_reason == "length"
        assert seq.output_token_ids == naive_generate(seq.token_ids[: seq.num_prompt_tokens], seq.max_tokens)


def test_mixed_lengths_give_unbatched_tokens_and_free_everything():
    scheduler, runner = make_scheduler(budget=16), FakeRunner(4)
    seqs = make_seqs([(5, 7), (23, 3), (1, 9), (40, 5), (12, 1)])
    for seq in seqs:
        scheduler.add(seq)
    batches = run_to_completion(scheduler, runner)
    assert_naive_tokens(seqs)
    assert_all_free(scheduler)
    assert all(sum(n for _, n, _ in b) <= 16 for b in batches)
    assert scheduler.num_preemptions == 0


def test_long_prompt_is_chunked_and_samples_only_after_its_last_chunk():
    scheduler, runner = make_scheduler(budget=10), FakeRunner(4)
    (seq,) = make_seqs([(25, 2)])
    scheduler.add(seq)
    seen = []
    while scheduler.has_unfinished():
        batch = scheduler.schedule()
        seen.append((batch.num_new_tokens[0], batch.do_sample[0], seq.num_computed_tokens))
        scheduler.postprocess(batch, runner.run(batch))
    assert seen == [(10, False, 0), (10, False, 10), (5, True, 20), (1, True, 25)]
    assert_naive_tokens([seq])


def test_decodes_come_first_and_prefills_fill_the_rest_of_the_budget():
    scheduler, runner = make_scheduler(budget=12), FakeRunner(4)
    decoding = make_seqs([(3, 20), (4, 20), (2, 20)])
    for seq in decoding:
        scheduler.add(seq)
    first = scheduler.schedule()  # three whole prompts (9 tokens) in one batch
    assert first.num_new_tokens == [3, 4, 2]
    scheduler.postprocess(first, runner.run(first))
    (late,) = make_seqs([(30, 2)], first_id=10)
    scheduler.add(late)
    batch = scheduler.schedule()
    assert [s.seq_id for s in batch.seqs] == [0, 1, 2, 10]
    assert batch.num_new_tokens == [1, 1, 1, 9] and batch.is_prefill == [False, False, False, True]
    scheduler.postprocess(batch, runner.run(batch))
    run_to_completion(scheduler, runner)
    assert_naive_tokens(decoding + [late])
    assert_all_free(scheduler)


def test_max_num_seqs_bounds_the_running_set():
    scheduler, runner = make_scheduler(max_num_seqs=2, budget=64), FakeRunner(4)
    seqs = make_seqs([(3, 4)] * 5)
    for seq in seqs:
        scheduler.add(seq)
    batches = run_to_completion(scheduler, runner)
    assert max(len(b) for b in batches) == 2
    assert_naive_tokens(seqs)
    assert_all_free(scheduler)


def test_kv_block_shortage_preempts_the_newest_and_recomputes_it():
    # 10 blocks of 4 tokens: three sequences growing to 9 + 12 tokens cannot all stay resident.
    scheduler, runner = make_scheduler(num_blocks=10, budget=64), FakeRunner(4)
    seqs = make_seqs([(9, 12), (9, 12), (9, 12)])
    for seq in seqs:
        scheduler.add(seq)
    run_to_completion(scheduler, runner)
    assert scheduler.num_preemptions > 0
    assert seqs[0].num_preemptions == 0  # the oldest is never the victim
    assert seqs[2].num_preemptions > 0
    assert_naive_tokens(seqs)
    assert_all_free(scheduler)


def test_preempted_sequence_recomputes_its_generated_tokens_as_prompt():
    scheduler, runner = make_scheduler(budget=64), FakeRunner(4)
    (old,) = make_seqs([(6, 8)])
    (new,) = make_seqs([(5, 8)], first_id=1)
    scheduler.add(old)
    scheduler.add(new)
    for _ in range(3):
        batch = scheduler.schedule()
        scheduler.postprocess(batch, runner.run(batch))
    assert new.num_output_tokens == 3
    scheduler.preempt(new)
    assert new.num_computed_tokens == 0 and new.state_slot is None and new.block_table == []
    batch = scheduler.schedule()
    index = batch.seqs.index(new)
    assert batch.num_new_tokens[index] == 5 + 3 and batch.is_prefill[index]
    scheduler.postprocess(batch, runner.run(batch))
    run_to_completion(scheduler, runner)
    assert_naive_tokens([old, new])
    assert_all_free(scheduler)


def test_state_slot_shortage_keeps_requests_waiting_until_a_slot_frees():
    scheduler, runner = make_scheduler(num_slots=2, budget=64), FakeRunner(4)
    seqs = make_seqs([(4, 3), (6, 5), (3, 4), (8, 2)])
    for seq in seqs:
        scheduler.add(seq)
    batches = run_to_completion(scheduler, runner)
    assert max(len(b) for b in batches) == 2
    assert scheduler.num_slot_waits > 0
    assert_naive_tokens(seqs)
    assert_all_free(scheduler)


def test_abort_returns_slot_and_blocks_at_once():
    scheduler, runner = make_scheduler(budget=64), FakeRunner(4)
    running, waiting = make_seqs([(9, 50), (3, 50)])
    scheduler.add(running)
    batch = scheduler.schedule()
    scheduler.postprocess(batch, runner.run(batch))
    scheduler.add(waiting)
    scheduler.abort(running)
    scheduler.abort(waiting)
    assert running.finish_reason == waiting.finish_reason == "abort"
    assert not scheduler.has_unfinished()
    assert_all_free(scheduler)
