"""Engine-level sampling, stop criteria, limits, logprobs and aborts on the tiny checkpoint."""

from __future__ import annotations

import pytest
import torch

from deltaserve import LLM, SamplingParams
from deltaserve.engine.llm_engine import LLMEngine
from helpers_engine import GreedyReference, assert_all_free, random_prompts
from helpers_model import make_checkpoint, reference_logits, reference_model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("engine_sampling"))


@pytest.fixture(scope="module")
def ref_model(checkpoint):
    return reference_model(checkpoint)


@pytest.fixture(scope="module")
def llm(checkpoint):
    return LLM(model=str(checkpoint), dtype="float32", block_size=4, max_num_batched_tokens=16)


def completions(llm: LLM, prompts, params) -> list:
    outputs = llm.generate(prompts, params, use_tqdm=False)
    assert_all_free(llm.get_metrics())
    return [o.outputs[0] for o in outputs]


def test_seeded_sampling_is_repeatable_and_seed_dependent(llm):
    prompts = random_prompts([6, 19], seed=10)
    params = SamplingParams(temperature=1.0, seed=123, max_tokens=12, ignore_eos=True)
    first = [c.token_ids for c in completions(llm, prompts, params)]
    again = [c.token_ids for c in completions(llm, prompts, params)]
    other_params = SamplingParams(temperature=1.0, seed=124, max_tokens=12, ignore_eos=True)
    other = [c.token_ids for c in completions(llm, prompts, other_params)]
    assert first == again
    assert first != other


def test_seeded_request_gives_same_tokens_alone_and_in_a_mixed_batch(llm):
    (target,) = random_prompts([21], seed=11)
    params = SamplingParams(temperature=0.8, top_p=0.9, seed=5, max_tokens=12, ignore_eos=True, logprobs=1)
    alone = completions(llm, [target], params)[0]
    others = random_prompts([3, 40, 9], seed=12)
    mixed_params = [SamplingParams(temperature=1.0, max_tokens=n, ignore_eos=True) for n in (20, 4, 15)]
    mixed = completions(llm, others[:2] + [target] + others[2:], mixed_params[:2] + [params] + mixed_params[2:])[2]
    assert mixed.token_ids == alone.token_ids
    # The logits of a chunked prefill in a mixed batch agree with those of a lone run to fp32 accuracy.
    assert mixed.cumulative_logprob == pytest.approx(alone.cumulative_logprob, rel=1e-4)


def test_top_k_one_equals_greedy(llm, ref_model):
    prompts = random_prompts([7, 15], seed=13)
    top1 = completions(llm, prompts, SamplingParams(temperature=1.0, top_k=1, max_tokens=8, ignore_eos=True))
    reference = GreedyReference(ref_model)
    assert [c.token_ids for c in top1] == [reference(p, 8) for p in prompts]


def test_greedy_logprobs_match_transformers_log_softmax(llm, ref_model):
    (prompt,) = random_prompts([11], seed=14)
    (out,) = completions(llm, [prompt], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=3))
    logits = reference_logits(ref_model, prompt + out.token_ids)[len(prompt) - 1 : -1]  # [6, vocab]
    expected = torch.log_softmax(logits.double(), dim=-1)
    for step, token in enumerate(out.token_ids):
        entry = out.logprobs[step]
        assert entry[token].rank == 1
        assert entry[token].logprob == pytest.approx(expected[step, token].item(), abs=1e-4)
        top3 = expected[step].topk(3).indices.tolist()
        assert set(top3) <= set(entry)
        assert entry[token].decoded_token == llm.get_tokenizer().decode([token])
    total = sum(expected[i, t].item() for i, t in enumerate(out.token_ids))
    assert out.cumulative_logprob == pytest.approx(total, abs=1e-3)


def baseline(llm, prompt, max_tokens=40):
    return completions(llm, [prompt], SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))[0]


def test_stop_token_id_ends_output_and_keeps_the_token(llm):
    (prompt,) = random_prompts([9], seed=15)
    base = baseline(llm, prompt, 20)
    stop_at = next(i for i in range(3, 20) if base.token_ids[i] not in base.token_ids[:i])
    stop_id = base.token_ids[stop_at]
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, stop_token_ids=[stop_id])
    (out,) = completions(llm, [prompt], params)
    assert out.token_ids == base.token_ids[: stop_at + 1]
    assert (out.finish_reason, out.stop_reason) == ("stop", stop_id)


def _ascii_stop_string(llm, prompt_seeds):
    """A prompt whose greedy output text holds a 2-letter ASCII string, the string and its position."""
    tokenizer = llm.get_tokenizer()
    for seed in prompt_seeds:
        (prompt,) = random_prompts([8], seed=seed)
        base = baseline(llm, prompt)
        assert base.text == tokenizer.decode(base.token_ids, skip_special_tokens=True)
        text = base.text
        for i in range(2, len(text) - 2):
            stop = text[i : i + 2]
            if stop.isascii() and stop.isalnum() and text.find(stop) == i:
                return prompt, base, stop, i
    pytest.fail("no greedy output with an ASCII pair: change the prompt seeds")


@pytest.mark.parametrize("include", [False, True])
def test_stop_string_cuts_text_and_keeps_tokens_up_to_it(llm, include):
    prompt, base, stop, index = _ascii_stop_string(llm, range(101, 140))
    tokenizer = llm.get_tokenizer()
    # The first j whose decoded prefix contains the stop string (naive, from scratch).
    j = next(j for j in range(1, 41) if stop in tokenizer.decode(base.token_ids[:j], skip_special_tokens=True))
    params = SamplingParams(
        temperature=0, max_tokens=40, ignore_eos=True, stop=[stop, "never-seen"], include_stop_str_in_output=include
    )
    (out,) = completions(llm, [prompt], params)
    assert out.token_ids == base.token_ids[:j]
    assert out.text == base.text[: index + (2 if include else 0)]
    assert (out.finish_reason, out.stop_reason) == ("stop", stop)


def test_eos_ends_output_unless_ignore_eos(tmp_path, llm):
    (prompt,) = random_prompts([9], seed=16)
    base = baseline(llm, prompt, 20)
    stop_at = next(i for i in range(2, 20) if base.token_ids[i] not in base.token_ids[:i])
    eos = base.token_ids[stop_at]
    eos_llm = LLM(model=str(make_checkpoint(tmp_path, eos_token_id=eos)), dtype="float32")
    (out,) = completions(eos_llm, [prompt], SamplingParams(temperature=0, max_tokens=20))
    assert out.token_ids == base.token_ids[: stop_at + 1]
    assert (out.finish_reason, out.stop_reason) == ("stop", None)
    (out,) = completions(eos_llm, [prompt], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    assert out.token_ids == base.token_ids and out.finish_reason == "length"


def test_max_tokens_is_clipped_to_max_model_len(checkpoint):
    llm = LLM(model=str(checkpoint), dtype="float32", max_model_len=20)
    (prompt,) = random_prompts([15], seed=17)
    (out,) = completions(llm, [prompt], SamplingParams(temperature=0, max_tokens=100, ignore_eos=True))
    assert len(out.token_ids) == 5 and out.finish_reason == "length"
    (out,) = completions(llm, [prompt], SamplingParams(temperature=0, max_tokens=None, ignore_eos=True))
    assert len(out.token_ids) == 5


def test_prompt_longer_than_max_model_len_is_rejected_and_nothing_added(checkpoint):
    engine = LLMEngine(model=str(checkpoint), dtype="float32", max_model_len=20)
    with pytest.raises(ValueError, match="prompt has 25 tokens but max_model_len is 20"):
        engine.add_request("a", list(range(25)), SamplingParams())
    assert not engine.has_unfinished_requests() and engine.num_waiting == 0
    engine.add_request("a", list(range(5)), SamplingParams(max_tokens=2))  # the id is still free


def test_max_model_len_beyond_the_kv_cache_is_rejected(checkpoint):
    with pytest.raises(ValueError, match="max_model_len = 64 tokens does not fit the KV cache"):
        LLMEngine(model=str(checkpoint), dtype="float32", max_model_len=64, num_kv_blocks=3, block_size=16)


@pytest.mark.parametrize("device", ["gpu0", "cuda:99"])
def test_unknown_or_absent_device_is_rejected_naming_it(checkpoint, device):
    with pytest.raises(ValueError, match=rf"device.*{device}"):
        LLMEngine(model=str(checkpoint), dtype="float32", device=device)


@pytest.mark.parametrize(
    "request_id, prompt, match",
    [
        ("x", [], "prompt is empty"),
        ("x", [1, 320], r"prompt token ids must be in \[0, 320\)"),
        ("x", 12, "prompt must be a str or a list of token ids"),
        ("dup", [1, 2], "already in use"),
        (7, [1, 2], "request_id must be a str"),
    ],
)
def test_bad_requests_are_rejected(checkpoint, request_id, prompt, match):
    engine = LLMEngine(model=str(checkpoint), dtype="float32")
    engine.add_request("dup", [3], SamplingParams())
    with pytest.raises(ValueError, match=match):
        engine.add_request(request_id, prompt, SamplingParams())
    assert engine.num_waiting == 1


def test_abort_frees_slot_and_blocks_at_once(checkpoint):
    engine = LLMEngine(model=str(checkpoint), dtype="float32", block_size=4)
    a, b = random_prompts([10, 6], seed=18)
    engine.add_request("a", a, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))
    engine.add_request("b", b, SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))
    engine.step()
    engine.step()
    before = engine.stats()
    final = engine.abort_request("a")
    after = engine.stats()
    assert final.finished and final.outputs[0].finish_reason == "abort" and len(final.outputs[0].token_ids) == 2
    assert after["state_slots_used"] == before["state_slots_used"] - 1
    assert after["kv_blocks_used"] == before["kv_blocks_used"] - 3  # 12 tokens in blocks of 4
    assert engine.abort_request("a") is None
    while engine.has_unfinished_requests():
        engine.step()
    assert_all_free(engine.stats())


def test_step_outputs_are_cumulative_and_finish_once(checkpoint):
    engine = LLMEngine(model=str(checkpoint), dtype="float32")
    engine.add_request("r", "Hello", SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    seen = []
    while engine.has_unfinished_requests():
        seen += engine.step()
    assert [len(o.outputs[0].token_ids) for o in seen] == [1, 2, 3, 4]
    assert [o.finished for o in seen] == [False, False, False, True]
    assert seen[-1].prompt == "Hello" and seen[-1].prompt_token_ids == list(b"Hello")
    stats = engine.stats()
    assert (stats["prompt_tokens"], stats["generation_tokens"]) == (5, 4)
