"""min_tokens, repetition/presence/frequency penalties, min_p, logit_bias and friends, against an
independent per-request reference: transformers' full forward per step and a float64 per-token loop."""

from __future__ import annotations

import math

import pytest
import torch

from deltaserve import LLM, SamplingParams
from deltaserve.engine.sampler import Sampler
from deltaserve.models.tiny import make_tokenizer
from helpers_engine import assert_all_free, random_prompts
from helpers_model import make_checkpoint, reference_logits, reference_model

EOS = make_tokenizer().eos_token_id


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("sampling_fields"))


@pytest.fixture(scope="module")
def ref_model(checkpoint):
    return reference_model(checkpoint)


def adjust(logits: list[float], params: SamplingParams, prompt: list[int], output: list[int]) -> list[float]:
    """vLLM's order, one token at a time in float64: min_tokens, logit_bias, penalties."""
    logits = list(logits)
    if len(output) < params.min_tokens:
        for token in set(params.stop_token_ids) | ({EOS} if not params.ignore_eos else set()):
            logits[token] = -math.inf
    for token, bias in (params.logit_bias or {}).items():
        logits[token] += bias
    for token in set(prompt) | set(output):
        rp = params.repetition_penalty
        logits[token] = logits[token] / rp if logits[token] > 0 else logits[token] * rp
    for token in set(output):
        count = output.count(token)
        logits[token] -= params.frequency_penalty * count + params.presence_penalty
    return logits


def reference_greedy(ref_model, prompt: list[int], params: SamplingParams) -> list[int]:
    output: list[int] = []
    while len(output) < params.max_tokens:
        logits = reference_logits(ref_model, prompt + output)[-1].double().tolist()
        scores = adjust(logits, params, prompt, output)
        token = max(range(len(scores)), key=lambda t: scores[t])
        output.append(token)
        if token in params.stop_token_ids or (token == EOS and not params.ignore_eos):
            break
    return output


GREEDY_CASES = {
    "repetition_penalty": dict(repetition_penalty=1.8),
    "repetition_penalty below 1": dict(repetition_penalty=0.6),
    "frequency_penalty": dict(frequency_penalty=2.0, logit_bias={65: 12.0}),
    "presence_penalty": dict(presence_penalty=2.0, logit_bias={65: 8.0}),
    "logit_bias": dict(logit_bias={65: 4.0, 66: 3.5, 7: -100.0}),
    "min_tokens holds back EOS": dict(min_tokens=5, logit_bias={EOS: 100.0}),
    "min_tokens holds back stop_token_ids": dict(min_tokens=3, stop_token_ids=[70], logit_bias={70: 100.0}),
    "everything at once": dict(min_tokens=2, repetition_penalty=1.3, frequency_penalty=0.4, presence_penalty=0.3,
                               logit_bias={EOS: 30.0, 100: 2.0}),
}


def test_greedy_with_each_field_equals_the_reference_in_one_batch(checkpoint, ref_model):
    llm = LLM(model=str(checkpoint), dtype="float32", block_size=4, max_num_batched_tokens=64)
    prompts = random_prompts([9 + i for i in range(len(GREEDY_CASES))], seed=21)
    params = [SamplingParams(temperature=0, max_tokens=8, **kwargs) for kwargs in GREEDY_CASES.values()]
    outputs = llm.generate(prompts, params, use_tqdm=False)
    # Without the field under test (the first of each case), the output must differ.
    without = [SamplingParams(temperature=0, max_tokens=8, **dict(list(kwargs.items())[1:]))
               for kwargs in GREEDY_CASES.values()]
    plain = llm.generate(prompts, without, use_tqdm=False)
    for name, prompt, p, out, base in zip(GREEDY_CASES, prompts, params, outputs, plain):
        assert out.outputs[0].token_ids == reference_greedy(ref_model, prompt, p), name
        assert out.outputs[0].token_ids != base.outputs[0].token_ids, f"{name} should change the greedy output"
    # The min_tokens cases stop right after min_tokens, on the biased stop token.
    assert outputs[5].outputs[0].token_ids[-1] == EOS and len(outputs[5].outputs[0].token_ids) == 6
    assert outputs[6].outputs[0].token_ids[-1] == 70 and len(outputs[6].outputs[0].token_ids) == 4
    assert_all_free(llm.get_metrics())


def test_a_tiny_temperature_is_greedy(checkpoint):
    llm = LLM(model=str(checkpoint), dtype="float32")
    prompts = random_prompts([7, 11], seed=23)
    greedy = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True), use_tqdm=False)
    tiny = llm.generate(prompts, SamplingParams(temperature=1e-40, max_tokens=10, ignore_eos=True), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in tiny] == [o.outputs[0].token_ids for o in greedy]


def test_min_p_frequencies_match_the_naive_distribution():
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, 1.5])
    draws = 6000
    params = SamplingParams(temperature=0.8, min_p=0.3)
    out = Sampler(torch.Generator().manual_seed(3))(logits.repeat(draws, 1), [params] * draws, [None] * draws)
    observed = torch.bincount(torch.tensor([o.token_id for o in out]), minlength=6).double() / draws
    probs = [math.exp(x / 0.8) for x in logits.tolist()]
    kept = [p if p >= 0.3 * max(probs) else 0.0 for p in probs]
    expected = [p / sum(kept) for p in kept]
    for e, o in zip(expected, observed.tolist()):
        assert abs(e - o) < 0.025 and (e > 0 or o == 0), (expected, observed)


def test_skip_special_tokens_shows_or_hides_special_token_text(checkpoint):
    # (include_stop_str_in_output: tests/test_engine_sampling.py)
    llm = LLM(model=str(checkpoint), dtype="float32")
    pad = llm.get_tokenizer().convert_tokens_to_ids("<|pad|>")
    base = dict(temperature=0, max_tokens=6, ignore_eos=True)
    shown = llm.generate("abc", SamplingParams(logit_bias={pad: 100.0}, skip_special_tokens=False, **base),
                         use_tqdm=False)[0].outputs[0]
    hidden = llm.generate("abc", SamplingParams(logit_bias={pad: 100.0}, **base), use_tqdm=False)[0].outputs[0]
    assert shown.token_ids == hidden.token_ids == [pad] * 6
    assert shown.text == "<|pad|>" * 6 and hidden.text == ""


@pytest.mark.parametrize("kwargs, field", [
    ({"min_tokens": -1}, "min_tokens"), ({"min_tokens": 5, "max_tokens": 4}, "min_tokens"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"), ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"frequency_penalty": float("nan")}, "frequency_penalty"), ({"min_p": 1.5}, "min_p"),
    ({"logit_bias": {3: 101.0}}, "logit_bias"), ({"logit_bias": {-1: 1.0}}, "logit_bias"),
    ({"prompt_logprobs": 21}, "prompt_logprobs"), ({"seed": 2**64}, "seed"), ({"top_k": 2**40}, "top_k"),
    ({"temperature": float("inf")}, "temperature"), ({"stop": ["x"] * 17}, "stop"),
    ({"stop_token_ids": [True]}, "stop_token_ids"), ({"n": 10**9}, "n"),
])
def test_sampling_params_bounds_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"^{field} must"):
        SamplingParams(**kwargs)


def test_out_of_vocab_ids_in_logit_bias_or_stop_token_ids_are_refused(checkpoint):
    llm = LLM(model=str(checkpoint), dtype="float32")
    for kwargs, field in (({"logit_bias": {10**6: 1.0}}, "logit_bias"), ({"stop_token_ids": [10**6]}, "stop_token_ids")):
        with pytest.raises(ValueError, match=rf"^{field}: token ids must be in \[0, 320\)"):
            llm.generate("a", SamplingParams(**kwargs), use_tqdm=False)
    # The highest seed and n still work (the generator seed wraps modulo 2**64).
    out = llm.generate("a", SamplingParams(seed=2**64 - 1, n=3, max_tokens=2), use_tqdm=False)[0]
    assert len(out.outputs) == 3
    assert_all_free(llm.get_metrics())


def test_fields_that_adjust_logits_give_the_same_tokens_with_speculative_decoding(checkpoint):
    # Such sequences get no drafts (the rejection sampler does not replay history per position).
    from helpers_spec import OracleProposer, oracle_config, spec_llm

    prompts = random_prompts([9, 12, 10], seed=24)
    params = [SamplingParams(temperature=0, max_tokens=8, **kwargs) for kwargs in (
        GREEDY_CASES["repetition_penalty below 1"], GREEDY_CASES["frequency_penalty"], GREEDY_CASES["logit_bias"])]
    plain = LLM(model=str(checkpoint), dtype="float32", block_size=4).generate(prompts, params, use_tqdm=False)
    # A drafter that proposes exactly the adjusted continuation: verified on unadjusted logits, it would diverge.
    drafter = OracleProposer([p + o.outputs[0].token_ids for p, o in zip(prompts, plain)], error_rate=0, skip_rate=0)
    spec = spec_llm(checkpoint, oracle_config(), proposer=drafter).generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in spec] == [o.outputs[0].token_ids for o in plain]
