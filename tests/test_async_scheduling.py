"""Async scheduling (one step in flight) gives exactly the synchronous engine's outputs.

The reference is the same engine with ``async_scheduling=False`` (the synchronous step is tested
against transformers elsewhere). Each workload runs on both and compares, per request and sequence,
token ids, text, finish and stop reasons and logprobs; the engine counters must agree, and every
slot and block must be back in the free lists at the end. Workloads: staggered arrivals in mixed
batches (greedy, seeded sampling, logprobs, prompt logprobs, min_tokens), sequences stopping at
different steps (EOS, stop strings, stop token ids, max_tokens: their rows in the step in flight
are discarded), ``n > 1``, chunked prefill, preemption, prefix-cache hits (a chat's next turn
restores the state checkpointed at a held release), aborts mid-stream, and the fallbacks
(penalties, structured outputs, speculative decoding).
"""

from __future__ import annotations

import argparse
import random

import pytest

from deltaserve import LLM, SamplingParams
from deltaserve.config import EngineConfig
from deltaserve.engine.async_step import PLACEHOLDER
from helpers_engine import assert_all_free, assert_all_free_after_reset

EOS = 257


def make_engine(async_scheduling: bool, **kwargs):
    kwargs.setdefault("block_size", 4)
    kwargs.setdefault("max_model_len", 512)
    engine = LLM(dtype="float32", async_scheduling=async_scheduling, **kwargs).llm_engine
    assert (engine.async_scheduler is not None) == async_scheduling
    return engine


def prompts(lengths: list[int], seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(256) for _ in range(n)] for n in lengths]


def drive(engine, arrivals: list[list[tuple]], abort_at: dict[int, list[str]] | None = None, reset: bool = True) -> dict:
    """Call ``step()`` until idle; ``arrivals[i]``: ``(request_id, prompt, params)`` added before call ``i``,
    ``abort_at[i]``: request ids aborted before call ``i``. Returns the final output per request.

    Then nothing may be held but what the prefix cache holds; ``reset``: drop the cache and find every
    slot and block back in the free lists."""
    final, call = {}, 0
    while call < len(arrivals) or engine.has_unfinished_requests():
        for request_id in (abort_at or {}).get(call, []):
            out = engine.abort_request(request_id)
            if out is not None:
                final[request_id] = out
        for request_id, prompt, params in arrivals[call] if call < len(arrivals) else []:
            engine.add_request(request_id, prompt, params)
        for out in engine.step():
            assert all(PLACEHOLDER not in c.token_ids for c in out.outputs)
            if out.finished:
                final[out.request_id] = out
        call += 1
        assert call < 10_000
    if not reset:
        assert_all_free(engine.get_metrics())
        return final
    assert_all_free_after_reset(engine)
    assert engine.runner.state_pool.num_free_slots == engine.runner.state_pool.num_slots
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    return final


def compare(sync_out: dict, async_out: dict) -> None:
    assert sync_out.keys() == async_out.keys()
    for request_id, expected in sync_out.items():
        got = async_out[request_id]
        assert got.finished == expected.finished
        assert got.num_cached_tokens >= 0
        for a, b in zip(got.outputs, expected.outputs, strict=True):
            assert a.token_ids == b.token_ids, request_id
            assert (a.text, a.finish_reason, a.stop_reason) == (b.text, b.finish_reason, b.stop_reason), request_id
            assert a.cumulative_logprob == pytest.approx(b.cumulative_logprob, abs=1e-3)
            assert (a.logprobs is None) == (b.logprobs is None)
            for entry_a, entry_b in zip(a.logprobs or [], b.logprobs or [], strict=True):
                assert entry_a.keys() == entry_b.keys()
                for token in entry_a:
                    assert entry_a[token].logprob == pytest.approx(entry_b[token].logprob, abs=1e-4)
        if expected.prompt_logprobs is not None:
            for entry_a, entry_b in zip(got.prompt_logprobs[1:], expected.prompt_logprobs[1:], strict=True):
                assert {t: e.logprob for t, e in entry_a.items()} == pytest.approx(
                    {t: e.logprob for t, e in entry_b.items()}, abs=1e-4)


def run_both(arrivals, abort_at=None, **kwargs) -> tuple[dict, dict, dict, dict]:
    """The workload on the synchronous and the async engine: (sync outputs, async outputs, their stats)."""
    results = []
    for flag in (False, True):
        engine = make_engine(flag, **kwargs)
        results.append((drive(engine, arrivals, abort_at), engine.get_metrics()))
    (sync_out, sync_stats), (async_out, async_stats) = results
    compare(sync_out, async_out)
    for stats, outs in ((sync_stats, sync_out), (async_stats, async_out)):
        assert stats["generation_tokens"] == sum(len(c.token_ids) for o in outs.values() for c in o.outputs)
    for key in ("num_requests", "num_finished_requests", "num_aborted_requests", "prompt_tokens", "generation_tokens"):
        assert async_stats[key] == sync_stats[key], key
    return sync_out, async_out, sync_stats, async_stats


def test_staggered_arrivals_in_mixed_batches():
    rng = random.Random(1)
    arrivals: list[list[tuple]] = [[] for _ in range(12)]
    kinds = [
        SamplingParams(temperature=0.0, max_tokens=9, ignore_eos=True),
        SamplingParams(temperature=1.0, seed=7, max_tokens=11, ignore_eos=True, logprobs=3),
        SamplingParams(temperature=0.8, top_k=20, top_p=0.9, seed=3, max_tokens=6, ignore_eos=True),
        SamplingParams(temperature=1.0, seed=5, min_p=0.05, max_tokens=8, ignore_eos=True, min_tokens=4),
        SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True, prompt_logprobs=2, logprobs=0),
        SamplingParams(temperature=0.0, max_tokens=7, logit_bias={EOS: 50.0}, min_tokens=3),
    ]
    for i, prompt in enumerate(prompts([rng.randrange(2, 40) for _ in range(18)], seed=1)):
        arrivals[rng.randrange(12)].append((f"r{i}", prompt, kinds[i % len(kinds)]))
    _, async_out, _, async_stats = run_both(arrivals, max_num_batched_tokens=48)
    assert async_stats["async_discarded_tokens"] > 0  # rows of finished sequences ran and were dropped
    assert any(o.outputs[0].finish_reason == "stop" for o in async_out.values())


def test_sequences_stopping_at_different_steps():
    """EOS (made likely by logit_bias, held back by min_tokens), stop strings, stop token ids and
    max_tokens end sequences at different steps, so many steps in flight carry discarded rows."""
    base = prompts([5, 17, 9, 30, 3, 12, 21, 8], seed=2)
    free_run = make_engine(False)
    probe = drive(free_run, [[(f"p{i}", p, SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True))
                              for i, p in enumerate(base)]])
    arrivals = [[]]
    for i, prompt in enumerate(base):
        out = probe[f"p{i}"].outputs[0]
        k = 2 + i * 2
        if i % 4 == 0:
            params = SamplingParams(temperature=0.0, max_tokens=30, logit_bias={EOS: 50.0}, min_tokens=k)
        elif i % 4 == 1:
            params = SamplingParams(temperature=0.0, max_tokens=30, stop_token_ids=[out.token_ids[k]], ignore_eos=True)
        elif i % 4 == 2:
            stop = out.text[k : k + 2] if len(out.text) > k + 2 else out.text[-2:]
            params = SamplingParams(temperature=0.0, max_tokens=30, stop=[stop], ignore_eos=True)
        else:
            params = SamplingParams(temperature=1.0, seed=i, max_tokens=k, ignore_eos=True)
        arrivals[0].append((f"r{i}", prompt, params))
    sync_out, _, _, _ = run_both(arrivals, max_num_seqs=8)
    reasons = [sync_out[f"r{i}"].outputs[0].finish_reason for i in range(len(base))]
    assert reasons.count("stop") >= 4 and "length" in reasons
    assert len({len(o.outputs[0].token_ids) for o in sync_out.values()}) >= 4


def test_n_sequences_per_request_with_seeds():
    arrivals = [[(f"r{i}", p, SamplingParams(n=3, temperature=1.0, seed=10 + i, max_tokens=5 + 4 * i, ignore_eos=True))
                 for i, p in enumerate(prompts([6, 13, 4], seed=3))], [],
                [("late", prompts([9], seed=4)[0], SamplingParams(n=2, temperature=0.0, max_tokens=6, ignore_eos=True))]]
    run_both(arrivals)


def test_chunked_prefill_beside_decodes():
    arrivals = [[("long0", prompts([150], seed=5)[0], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))],
                [("short", prompts([5], seed=6)[0], SamplingParams(temperature=1.0, seed=1, max_tokens=12, ignore_eos=True))],
                [], [("long1", prompts([90], seed=7)[0], SamplingParams(temperature=1.0, seed=2, max_tokens=6, ignore_eos=True))]]
    run_both(arrivals, max_num_batched_tokens=16)


def test_preemption_with_a_small_kv_cache():
    arrivals = [[(f"r{i}", p, SamplingParams(temperature=1.0 if i % 2 else 0.0, seed=i, max_tokens=14, ignore_eos=True))
                 for i, p in enumerate(prompts([10, 7, 12, 5, 9], seed=8))]]
    _, _, sync_stats, async_stats = run_both(arrivals, num_kv_blocks=16, max_model_len=64)
    assert sync_stats["num_preemptions"] > 0 and async_stats["num_preemptions"] > 0


@pytest.mark.parametrize("in_forward", [True, False])
def test_prefix_cache_hits_and_the_next_turn_of_a_chat(in_forward):
    """Round 2 shares round 1's prompts (branch and interval checkpoints) and continues its outputs:
    it restores what the releases of round 1 checkpointed, held releases included."""
    system = prompts([70], seed=9)[0]
    first = [system + p for p in prompts([3, 9, 14], seed=10)]
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    kwargs = dict(checkpoint_interval=64) if in_forward else dict(checkpoint_interval=8, extra={"checkpoints_in_forward": False})
    results = []
    for flag in (False, True):
        engine = make_engine(flag, **kwargs)
        round1 = drive(engine, [[(f"a{i}", p, params) for i, p in enumerate(first)]], reset=False)
        follow = [p + round1[f"a{i}"].outputs[0].token_ids + [65, 66, 67] for i, p in enumerate(first)]
        round2 = drive(engine, [[(f"b{i}", p, params) for i, p in enumerate(follow)]])
        results.append((round1, round2, engine.get_metrics()))
    (s1, s2, sync_stats), (a1, a2, async_stats) = results
    compare(s1, a1)
    compare(s2, a2)
    assert async_stats["prefix_cache_hits"] >= 3 and async_stats["prefix_cache_hit_tokens"] > 0
    # the next turn hits at least the whole previous prompt (a release checkpoint, some of them held)
    for i, p in enumerate(first):
        assert a2[f"b{i}"].num_cached_tokens >= len(p), i


def test_abort_mid_stream():
    arrivals = [[(f"r{i}", p, SamplingParams(temperature=1.0, seed=i, max_tokens=20, ignore_eos=True))
                 for i, p in enumerate(prompts([4, 8, 30, 6], seed=11))]]
    abort_at = {3: ["r1"], 6: ["r2", "r3"]}
    outs = {}
    for flag in (False, True):
        engine = make_engine(flag, max_num_batched_tokens=16)
        outs[flag] = drive(engine, arrivals, abort_at)
        assert engine.get_metrics()["num_aborted_requests"] == 3
    full = drive(make_engine(False), arrivals)
    for request_id in ("r0",):
        assert outs[True][request_id].outputs[0].token_ids == outs[False][request_id].outputs[0].token_ids
    for request_id in ("r1", "r2", "r3"):
        for flag in (False, True):
            got = outs[flag][request_id].outputs[0]
            assert got.finish_reason == "abort"
            assert got.token_ids == full[request_id].outputs[0].token_ids[: len(got.token_ids)]


def test_a_finished_sequence_keeps_its_slot_until_its_discarded_row_is_resolved():
    engine = make_engine(True)
    engine.add_request("short", prompts([5], seed=12)[0], SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True))
    engine.add_request("long", prompts([7], seed=13)[0], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
    pool = engine.runner.state_pool
    seen_held = False
    while engine.has_unfinished_requests():
        outs = {o.request_id: o for o in engine.step()}
        inflight = engine.async_scheduler.inflight
        if "short" in outs and outs["short"].finished:
            assert inflight is not None
            held = [s for s in inflight.held if s.request_id == "short"]
            assert len(held) == 1 and held[0].state_slot is not None
            assert held[0].state_slot not in pool._free  # not reusable while its row may still write it
            assert engine.get_metrics()["state_slots_cached"] >= 1
            seen_held = True
    assert seen_held
    assert_all_free_after_reset(engine)


def test_fallbacks_stay_exact():
    """Penalties and grammars make the next step wait for the tokens; steps that may draft run
    synchronously (the rest of a speculative engine's steps: test_steps_without_drafts_are_pipelined)."""
    ps = prompts([6, 11, 4, 9], seed=14)
    arrivals = [[("pen", ps[0], SamplingParams(temperature=1.0, seed=1, max_tokens=10, repetition_penalty=1.3,
                                               frequency_penalty=0.4, ignore_eos=True)),
                 ("json", ps[1], SamplingParams(temperature=1.0, seed=2, max_tokens=40,
                                                structured_outputs={"choice": ["alpha", "beta", "gamma"]})),
                 ("plain", ps[2], SamplingParams(temperature=1.0, seed=3, max_tokens=12, ignore_eos=True))], [],
                [("late", ps[3], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, presence_penalty=0.5))]]
    sync_out, _, _, _ = run_both(arrivals)
    assert sync_out["json"].outputs[0].text in ("alpha", "beta", "gamma")

    spec = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3}
    repetitive = [[1, 2, 3, 4] * 5, [9, 8, 7] * 6]
    sync = make_engine(False, speculative_config=spec)
    engine = make_engine(True, speculative_config=spec)
    arrivals = [[(f"s{i}", p, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))
                 for i, p in enumerate(repetitive)]]
    compare(drive(sync, arrivals), drive(engine, arrivals))
    assert engine.get_metrics()["spec_decode_num_drafts"] == sync.get_metrics()["spec_decode_num_drafts"] > 0


def counting_pipeline(engine) -> list[int]:
    """Counts the engine's pipelined steps (``AsyncScheduler.step`` calls) in ``[n]``."""
    calls = [0]
    step = engine.async_scheduler.step

    def counted():
        calls[0] += 1
        return step()

    engine.async_scheduler.step = counted
    return calls


@pytest.mark.parametrize("case", ["auto_disable", "batch_size"])
def test_steps_without_drafts_are_pipelined(case):
    """A speculative engine pipelines the steps its speculator cannot draft for (an auto-disable
    pause, more sequences than disable_by_batch_size) and verifies the others synchronously, with
    the tokens of async scheduling off."""
    if case == "auto_disable":
        # Drafts that are never accepted (synthetic, acceptance 1.0): pauses of 4 steps between probes.
        # The pause counts steps as the synchronous engine does: the same verify steps, so seeded
        # sampling rows draw the same numbers too.
        spec = {"method": "synthetic", "num_speculative_tokens": 2, "synthetic_acceptance_length": 1.0,
                "auto_disable_probe_steps": 4}
        ps = prompts([7, 12, 5, 9], seed=21)
        params = [SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True),
                  SamplingParams(temperature=1.0, seed=5, max_tokens=24, ignore_eos=True)]
    else:
        # n-gram drafts (exact for greedy) once at most two of four sequences are left. NOTE: a pipelined
        # step decides before the step in flight releases its finished sequences, so around the limit it
        # may draft one step later than the synchronous engine: greedy tokens are the same, counts not.
        spec = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3, "disable_by_batch_size": 2,
                "auto_disable": False}
        ps = [[1, 2, 3, 4] * 5, [9, 8, 7] * 6, [5, 6] * 8, [11, 12, 13, 14, 15] * 3]
        params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in (6, 9, 30, 34)]
    arrivals = [[(f"r{i}", ps[i], params[i % len(params)]) for i in range(4)]]
    sync = make_engine(False, speculative_config=spec)
    engine = make_engine(True, speculative_config=spec)
    pipelined = counting_pipeline(engine)
    compare(drive(sync, arrivals), drive(engine, arrivals))
    ours, theirs = engine.get_metrics(), sync.get_metrics()
    assert pipelined[0] > 3 and ours["spec_decode_num_drafts"] > 0
    if case == "auto_disable":
        assert ours["spec_decode_num_drafts"] == theirs["spec_decode_num_drafts"]
    else:
        assert ours["spec_decode_num_accepted_tokens"] > 0


def test_mtp_keeps_the_synchronous_step(tmp_path):
    from helpers_model import make_checkpoint

    checkpoint = make_checkpoint(tmp_path, arch="qwen3_next")
    engine = LLM(model=str(checkpoint), dtype="float32", async_scheduling=True,
                 speculative_config={"method": "mtp", "num_speculative_tokens": 1}).llm_engine
    assert engine.async_scheduler is None


def test_setting_and_flags():
    assert EngineConfig().async_scheduling is None
    assert LLM(dtype="float32").llm_engine.async_scheduler is None  # the CPU default: off
    with pytest.raises(ValueError, match="async_scheduling"):
        EngineConfig(async_scheduling="yes")
    from deltaserve.commands.generate import add_engine_arguments, engine_kwargs

    parser = argparse.ArgumentParser()
    add_engine_arguments(parser)
    assert engine_kwargs(parser.parse_args([]))["async_scheduling"] is None
    assert engine_kwargs(parser.parse_args(["--async-scheduling"]))["async_scheduling"] is True
    assert engine_kwargs(parser.parse_args(["--no-async-scheduling"]))["async_scheduling"] is False
