"""Speculative decoding through the whole engine (Kimi-Linear, float32): greedy tokens identical to
decoding without drafts and to transformers, whether drafts are accepted, rejected or absent, with
chunked prefill, preemption, prefix-cache hits, ``n > 1`` and stop tokens; metrics count them."""

from __future__ import annotations

import pytest

from deltaserve import SamplingParams
from deltaserve.engine.llm_engine import LLMEngine
from helpers_engine import GreedyReference, assert_all_free, random_prompts
from helpers_model import make_checkpoint, reference_model
from helpers_spec import NGRAM, OracleProposer, oracle_config, spec_llm

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("spec_engine"))


@pytest.fixture(scope="module")
def reference(checkpoint):
    return GreedyReference(reference_model(checkpoint))


def tokens_of(llm, prompts, params=GREEDY) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


def oracle_llm(checkpoint, reference, prompts, max_tokens=12, **kwargs):
    sequences = [p + reference(p, max_tokens) for p in prompts]
    return spec_llm(checkpoint, oracle_config(), proposer=OracleProposer(sequences), **kwargs)


def check_drafts(stats: dict) -> None:
    """Drafts were verified, some accepted (all three at times) and some rejected."""
    assert stats["spec_decode_num_draft_tokens"] > stats["spec_decode_num_accepted_tokens"] > 0, stats
    assert stats["spec_decode_num_accepted_tokens_pos_2"] > 0, stats


def test_ngram_drafts_on_repetitive_prompts_give_the_greedy_tokens(checkpoint, reference):
    prompts = [[5, 6, 7, 8] * 5, [40, 41, 42] * 6 + [40], [9, 9, 9, 9, 9, 9]]
    llm = spec_llm(checkpoint, NGRAM)
    assert tokens_of(llm, prompts) == [reference(p, 12) for p in prompts]
    stats = llm.get_metrics()
    assert stats["spec_decode_num_draft_tokens"] > 0
    assert_all_free(stats)


def test_accepted_rejected_and_absent_drafts_give_the_greedy_tokens(checkpoint, reference):
    prompts = random_prompts([3, 11, 6, 17], seed=11)
    llm = oracle_llm(checkpoint, reference, prompts)
    outputs = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == [reference(p, 12) for p in prompts]
    stats = llm.get_metrics()
    check_drafts(stats)
    per_request = [o.spec_decode_metrics for o in outputs]
    assert sum(m["num_draft_tokens"] for m in per_request) == stats["spec_decode_num_draft_tokens"]
    assert sum(m["num_accepted_tokens"] for m in per_request) == stats["spec_decode_num_accepted_tokens"]
    assert stats["generation_tokens"] == 4 * 12 and stats["decode_only_steps"] < 4 * 11
    assert_all_free(stats)


def test_chunked_prefill_and_late_arrivals_beside_verify_rows(checkpoint, reference):
    prompts = random_prompts([9, 30, 4, 21], seed=12)
    sequences = [p + reference(p, 12) for p in prompts]
    engine = LLMEngine(model=str(checkpoint), dtype="float32", block_size=4, max_num_batched_tokens=9,
                       speculative_config=oracle_config())  # fmt: skip
    engine.runner.speculator.proposer = OracleProposer(sequences, seed=1)
    finished = {}

    def step():
        finished.update({o.request_id: o.outputs[0].token_ids for o in engine.step() if o.finished})

    engine.add_request("0", prompts[0], GREEDY)
    for _ in range(3):
        step()
    engine.add_request("1", prompts[1], GREEDY)
    step()
    engine.add_request("2", prompts[2], GREEDY)
    engine.add_request("3", prompts[3], GREEDY)
    while engine.has_unfinished_requests():
        step()
    assert [finished[str(i)] for i in range(4)] == [reference(p, 12) for p in prompts]
    stats = engine.stats()
    assert stats["mixed_steps"] > 0
    check_drafts(stats)
    assert_all_free(stats)


def test_preemption_with_drafts_gives_the_greedy_tokens(checkpoint, reference):
    prompts = random_prompts([14, 14, 14, 14], seed=13)
    llm = oracle_llm(checkpoint, reference, prompts, num_kv_blocks=13)
    assert tokens_of(llm, prompts) == [reference(p, 12) for p in prompts]
    stats = llm.get_metrics()
    assert stats["num_preemptions"] > 0
    check_drafts(stats)
    assert_all_free(stats)


def test_prefix_cache_hits_after_speculative_requests_give_the_greedy_tokens(checkpoint, reference):
    (first,) = random_prompts([10], seed=14)
    first_out = reference(first, 12)
    # The next turn starts with the first request's prompt and output: it hits the checkpoint the
    # first request left at its release (after verify steps), so that checkpoint must hold no draft.
    second = first + first_out + [3, 4, 5]
    prompts = [first, second, first + [7, 8]]
    llm = oracle_llm(checkpoint, reference, prompts)
    outs = [tokens_of(llm, [p])[0] for p in prompts]
    assert outs == [reference(p, 12) for p in prompts]
    stats = llm.get_metrics()
    # Hits at 21 (prompt + 11 computed output tokens) and at 10 (the first prompt's end).
    assert stats["prefix_cache_hits"] == 2 and stats["prefix_cache_hit_tokens"] == 21 + 10
    check_drafts(stats)


def test_n_sequences_and_a_stop_token_inside_accepted_drafts(checkpoint, reference):
    (prompt,) = random_prompts([8], seed=15)
    full = reference(prompt, 12)
    stop = full[6]
    expected = full[: full.index(stop) + 1]
    params = SamplingParams(n=3, temperature=0.0, max_tokens=12, stop_token_ids=[stop])
    llm = spec_llm(checkpoint, oracle_config(), proposer=OracleProposer([prompt + full], error_rate=0.0, skip_rate=0.0))
    (out,) = llm.generate([prompt], params, use_tqdm=False)
    assert [c.token_ids for c in out.outputs] == [expected] * 3
    assert all(c.finish_reason == "stop" and c.stop_reason == stop for c in out.outputs)
    # A later request continuing the stopped one hits its checkpoint and still decodes exactly.
    follow = prompt + expected + [1, 2]
    assert tokens_of(llm, [follow]) == [reference(follow, 12)]
    assert llm.get_metrics()["prefix_cache_hits"] >= 1


def test_fewer_verify_rows_than_sequences_run_the_rest_without_drafts(checkpoint, reference):
    prompts = random_prompts([5, 9, 7], seed=16)
    config = dict(oracle_config(), max_num_spec_seqs=1)
    sequences = [p + reference(p, 12) for p in prompts]
    llm = spec_llm(checkpoint, config, proposer=OracleProposer(sequences, skip_rate=0.0))
    runner = llm.llm_engine.runner
    rows = []
    original = runner.step_inputs

    def counting(batch):
        inputs = original(batch)
        if inputs.num_verify_seqs:
            rows.append(inputs.num_verify_seqs)
        return inputs

    runner.step_inputs = counting
    assert tokens_of(llm, prompts) == [reference(p, 12) for p in prompts]
    assert rows and max(rows) == 1


def test_seeded_sampling_with_drafts_is_repeatable_and_batch_independent(checkpoint):
    (prompt,) = random_prompts([6], seed=17)
    others = random_prompts([9, 4], seed=18)
    params = SamplingParams(temperature=0.9, top_p=0.9, seed=123, max_tokens=12, ignore_eos=True)
    other_params = SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True)
    config = {"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 1, "auto_disable": False}
    alone = tokens_of(spec_llm(checkpoint, config), [prompt], params)[0]
    llm = spec_llm(checkpoint, config)
    batched = llm.generate([others[0], prompt, others[1]], [other_params, params, other_params], use_tqdm=False)
    assert batched[1].outputs[0].token_ids == alone
    assert llm.get_metrics()["spec_decode_num_draft_tokens"] > 0


def test_bad_speculative_config_is_a_clear_error(checkpoint):
    with pytest.raises(ValueError, match=r"num_speculative_tokens must be an integer in 1..16, got 0"):
        spec_llm(checkpoint, {"method": "ngram", "num_speculative_tokens": 0})
    with pytest.raises(ValueError, match=r"method must be one of"):
        spec_llm(checkpoint, {"method": "eagle9", "num_speculative_tokens": 2})
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['prompt_lookup'\]"):
        spec_llm(checkpoint, {"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup": 3})


def test_a_sequence_whose_drafts_a_chunk_end_cut_does_not_precede_verify_rows(checkpoint):
    from deltaserve.engine.scheduler import Scheduler
    from deltaserve.engine.sequence import Sequence, SequenceStatus
    from deltaserve.kv.block_manager import BlockManager
    from deltaserve.state.pool import StatePool

    from deltaserve.engine.prefix_hooks import NoPrefixCache

    class ClipFirst(NoPrefixCache):  # a prefix cache whose checkpoint position ends sequence 0's next chunk at once
        def clip_chunk(self, seq, n):
            return 1 if seq.seq_id == 0 else n

    llm = spec_llm(checkpoint, NGRAM)
    pool = StatePool(llm.llm_engine.runner.model.state_groups(), 4)
    scheduler = Scheduler(max_num_seqs=4, max_num_batched_tokens=64, state_pool=pool,
                          block_manager=BlockManager(16, 4), check_stop=lambda s: None, prefix_cache=ClipFirst())  # fmt: skip
    seqs = [Sequence(i, str(i), 0, [1, 2, 3, 4, 5], GREEDY, 12) for i in range(2)]
    for seq in seqs:
        seq.status, seq.state_slot, seq.num_computed_tokens = SequenceStatus.RUNNING, pool.allocate(1)[0], 4
        seq.spec_token_ids = [7, 8]
        scheduler.running.append(seq)
    batch = scheduler.schedule()
    assert [s.seq_id for s in batch.seqs] == [1, 0] and batch.num_draft_tokens == [2, 0]
    assert seqs[0].spec_token_ids == []


def test_cli_speculative_config_and_server_metrics(checkpoint, reference, capsys):
    from deltaserve.cli import main
    from deltaserve.server.engine_stats import engine_stats

    config = '{"method": "ngram", "num_speculative_tokens": 2, "auto_disable": false}'
    assert main(["generate", "--model", str(checkpoint), "--dtype", "float32", "--max-tokens", "8",
                 "--ignore-eos", "--speculative-config", config, "abcabcabcabc"]) == 0  # fmt: skip
    with pytest.raises(SystemExit):
        main(["generate", "--speculative-config", "{ngram", "hi"])
    assert "--speculative-config: not valid JSON" in capsys.readouterr().err
    assert main(["generate", "--speculative-config", '{"method": "ngram", "num_speculative_tokens": 99}', "hi"]) == 2
    assert "num_speculative_tokens must be an integer in 1..16, got 99" in capsys.readouterr().err

    llm = spec_llm(checkpoint, NGRAM)
    tokens_of(llm, [[5, 6, 7, 8] * 5, [40, 41, 42] * 6 + [40], [9, 9, 9, 9, 9, 9]])
    stats = engine_stats(llm.llm_engine)
    for name in ("spec_decode_num_drafts", "spec_decode_num_draft_tokens", "spec_decode_num_accepted_tokens",
                 "spec_decode_mean_acceptance_length"):  # fmt: skip
        assert name in stats, sorted(stats)
    assert stats["spec_decode_num_draft_tokens"][1] > 0


def test_checkpoints_saved_inside_a_prefill_beside_verify_rows_give_exact_hits(checkpoint, reference):
    (short,) = random_prompts([6], seed=31)
    (long,) = random_prompts([150], seed=32)
    later = long[:140] + [1, 2, 3]  # hits the checkpoint at 128 that long's prefill saved in the forward
    sequences = [p + reference(p, 12) for p in (short, long, later)]
    engine = LLMEngine(model=str(checkpoint), dtype="float32", block_size=4, checkpoint_interval=64,
                       speculative_config=oracle_config())  # fmt: skip
    engine.runner.speculator.proposer = OracleProposer(sequences, skip_rate=0.0, seed=2)
    finished = {}

    def run_until_done():
        while engine.has_unfinished_requests():
            finished.update({o.request_id: o.outputs[0].token_ids for o in engine.step() if o.finished})

    engine.add_request("short", short, GREEDY)
    engine.step()
    engine.step()  # "short" verifies drafts from here on
    engine.add_request("long", long, GREEDY)  # its prefill runs beside the verify rows
    run_until_done()
    engine.add_request("later", later, GREEDY)
    run_until_done()
    assert [finished[r] for r in ("short", "long", "later")] == [reference(p, 12) for p in (short, long, later)]
    stats = engine.stats()
    assert stats["checkpoints_captured"] >= 2 and stats["prefix_cache_hit_tokens"] >= 128
    assert stats["mixed_steps"] > 0 and stats["spec_decode_num_accepted_tokens"] > 0


def test_stop_strings_and_logprobs_with_drafts_equal_those_without():
    from deltaserve import LLM

    prompt = "The state of a linear layer"
    plain = LLM(dtype="float32", max_model_len=256)
    free = plain.generate([prompt], SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True), use_tqdm=False)
    text = free[0].outputs[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 2]  # a stop string in the middle of the output
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, stop=[stop], logprobs=2)
    expected = plain.generate([prompt], params, use_tqdm=False)[0].outputs[0]
    tokenizer = plain.get_tokenizer()
    sequences = [tokenizer.encode(prompt) + free[0].outputs[0].token_ids]
    llm = LLM(dtype="float32", max_model_len=256, speculative_config=oracle_config())
    llm.llm_engine.runner.speculator.proposer = OracleProposer(sequences, error_rate=0.2, skip_rate=0.0)
    got = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0]
    assert (got.text, got.token_ids, got.finish_reason, got.stop_reason) == (
        expected.text, expected.token_ids, "stop", stop)
    for want, have in zip(expected.logprobs, got.logprobs):
        assert want.keys() == have.keys()
        assert all(abs(want[t].logprob - have[t].logprob) < 1e-4 and want[t].rank == have[t].rank for t in want)
    assert llm.get_metrics()["spec_decode_num_accepted_tokens"] > 0


@pytest.mark.parametrize("length", [1.0, 2.0, 2.5, 3.4, 4.0])
def test_synthetic_acceptance_realises_the_asked_mean_in_short_runs(length):
    from deltaserve.spec_decode.proposer import SyntheticAcceptance

    for seed in range(3):
        acceptance = SyntheticAcceptance(length, seed)
        counts = [n for _ in range(40) for n in acceptance.num_accepted([3])]  # batch 1, 40 verify steps
        assert abs(sum(counts) / len(counts) + 1 - length) <= 1 / len(counts) + 1e-12
        assert set(counts) <= {int(length - 1), min(3, int(length - 1) + 1)}
    # Rows with fewer drafts accept what they have.
    assert SyntheticAcceptance(4.0).num_accepted([3, 1, 0]) == [3, 1, 0]
