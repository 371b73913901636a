"""Structured outputs offline: ``SamplingParams(structured_outputs=...)`` on ``LLM.generate``.

Independent checks: ``jsonschema`` validates the JSON, Python's ``re`` the regexes; the allowed
first tokens of a choice grammar are written out by hand; a matcher rolled back is compared with a
fresh matcher fed the same tokens; unconstrained requests are compared with the same requests run
without constrained neighbours.
"""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch

from deltaserve import LLM, SamplingParams, StructuredOutputsParams
from deltaserve.engine.sampler import Sampler
from deltaserve.models.tiny import make_tokenizer
from deltaserve.structured import GrammarCompiler, StructuredMatcher, apply_structured_outputs

# NOTE: a pattern, not maxLength, bounds the string: xgrammar 0.2.9's maxLength strings admit raw control
# characters, which strict JSON parsers refuse.
SCHEMA = {
    "type": "object",
    "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 999}, "tag": {"enum": ["a", "b", "c"]},
                   "name": {"type": "string", "pattern": "^[a-z ]{1,6}$"}},
    "required": ["id", "tag", "name"],
    "additionalProperties": False,
}
REGEX = r"[a-z]{2,5}-[0-9]{2}"
CHOICES = ["red", "green", "blue \"sky\""]
VOCAB, EOS = 320, 257
NUM_SEEDS = 12


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    return LLM(dtype="float32", max_model_len=512, max_num_seqs=16)


def _run(llm, prompts, params):
    return [o.outputs[0] for o in llm.generate(prompts, params, use_tqdm=False)]


def test_json_schema_outputs_validate_for_every_seed(llm):
    params = [SamplingParams(temperature=1.0, seed=s, max_tokens=400, structured_outputs={"json": SCHEMA})
              for s in range(NUM_SEEDS)]
    outs = _run(llm, ["Describe a record:"] * NUM_SEEDS, params)
    for out in outs:
        assert out.finish_reason == "stop", out.text
        jsonschema.validate(json.loads(out.text), SCHEMA)
        assert out.token_ids[-1] == EOS  # the grammar ended, then only EOS was allowed
    assert len({o.text for o in outs}) > 1  # the seeds really sample


def test_regex_choice_and_compact_json(llm):
    params = ([SamplingParams(temperature=1.0, seed=s, max_tokens=40, structured_outputs={"regex": REGEX})
               for s in range(NUM_SEEDS)]
              + [SamplingParams(temperature=1.0, seed=s, max_tokens=40, structured_outputs={"choice": CHOICES})
                 for s in range(NUM_SEEDS)]
              + [SamplingParams(temperature=0.0, max_tokens=60, structured_outputs=StructuredOutputsParams(
                  json=json.dumps(SCHEMA), disable_any_whitespace=True))])
    outs = _run(llm, ["x"] * len(params), params)
    for out in outs[:NUM_SEEDS]:
        assert out.finish_reason == "stop" and re.fullmatch(REGEX, out.text), out.text
    for out in outs[NUM_SEEDS:2 * NUM_SEEDS]:
        assert out.finish_reason == "stop" and out.text in CHOICES, out.text
    compact = outs[-1]
    assert compact.finish_reason == "stop" and not re.search(r"[\n\t\r]|\s\s", compact.text), compact.text
    jsonschema.validate(json.loads(compact.text), SCHEMA)


def test_json_object_outputs_that_stop_are_objects(llm):
    params = [SamplingParams(temperature=1.0, seed=s, max_tokens=120, structured_outputs={"json_object": True,
              "disable_any_whitespace": True}) for s in range(8)]
    outs = _run(llm, ["{"] * 8, params)
    stopped = [o for o in outs if o.finish_reason == "stop"]
    assert stopped, [o.text[:40] for o in outs]
    for out in stopped:
        assert isinstance(json.loads(out.text), dict)
    for out in outs:
        assert out.finish_reason in ("stop", "length") and out.text.startswith("{")


def test_unconstrained_neighbours_are_untouched(llm):
    """Seeded sampled and greedy requests give the same tokens and logprobs with or without constrained rows."""
    free = [SamplingParams(temperature=0.9, seed=7, max_tokens=24, ignore_eos=True, logprobs=2),
            SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)]
    prompts = ["The state of a layer", "Linear attention"]
    alone = _run(llm, prompts, free)
    constrained = [SamplingParams(temperature=1.0, seed=s, max_tokens=60, structured_outputs={"regex": REGEX})
                   for s in range(4)]
    mixed = _run(llm, prompts + ["y"] * 4, free + constrained)
    # NOTE: the tokens are exact; the logprobs only to float32 rounding, since the model's CPU matmuls
    # round differently with another batch shape (the sampler's rows are bit-identical, tested below).
    for a, b in zip(alone, mixed[:2]):
        assert a.token_ids == b.token_ids
        assert a.cumulative_logprob == pytest.approx(b.cumulative_logprob, rel=1e-5)
    assert all(re.fullmatch(REGEX, o.text) for o in mixed[2:])


@pytest.mark.parametrize("spec, field, problem", [
    ({"json": '{"type": "object", "properties": '}, "structured_outputs.json", "JSON"),
    ({"json": {"type": "no-such-type"}}, "structured_outputs.json", "no-such-type"),
    ({"regex": "(ab"}, "structured_outputs.regex", "parenthesis"),
    ({"grammar": "root ::= undefined_rule"}, "structured_outputs.grammar", "undefined_rule"),
])
def test_a_constraint_that_does_not_compile_is_a_value_error(llm, spec, field, problem):
    with pytest.raises(ValueError, match=re.escape(field)) as info:
        llm.generate("x", SamplingParams(structured_outputs=spec), use_tqdm=False)
    assert problem in str(info.value)
    assert not llm.llm_engine.has_unfinished_requests()


def test_n_sequences_each_follow_the_grammar(llm):
    out = llm.generate("x", SamplingParams(n=4, seed=1, max_tokens=40, structured_outputs={"regex": REGEX}),
                       use_tqdm=False)[0]
    assert len(out.outputs) == 4 and all(re.fullmatch(REGEX, o.text) for o in out.outputs)


def test_sampler_rows_without_a_grammar_are_bit_identical(compiler):
    logits = torch.randn(2, VOCAB)
    params = [SamplingParams(temperature=0.8, seed=3, logprobs=3), SamplingParams(temperature=0.8, seed=4)]
    matcher = StructuredMatcher(compiler.compile(StructuredOutputsParams(regex="[0-9]+")))

    def sample(rows, structured):
        gens = [torch.Generator().manual_seed(params[r].seed) for r in rows]
        return Sampler()(logits[rows], [params[r] for r in rows], gens, structured)

    alone = sample([0], None)[0]
    mixed = sample([0, 1], [None, matcher])
    assert mixed[0] == alone
    assert chr(mixed[1].token_id).isdigit()


def test_params_need_exactly_one_constraint():
    with pytest.raises(ValueError, match="exactly one of"):
        StructuredOutputsParams(json=SCHEMA, regex="a")
    with pytest.raises(ValueError, match="exactly one of"):
        StructuredOutputsParams()
    with pytest.raises(ValueError, match="structured_outputs"):
        SamplingParams(structured_outputs={"jsn": SCHEMA})
    with pytest.raises(ValueError, match="choice"):
        StructuredOutputsParams(choice=[])


@pytest.fixture(scope="module")
def compiler():
    return GrammarCompiler(make_tokenizer(), VOCAB, [EOS])


def test_compiled_grammars_are_cached(compiler):
    before = compiler.num_compiled
    first = compiler.compile(StructuredOutputsParams(json=dict(SCHEMA)))
    again = compiler.compile(StructuredOutputsParams(json=json.loads(json.dumps(SCHEMA))))
    assert again is first and compiler.num_compiled == before + 1 and compiler.num_cache_hits >= 1


def _allowed(matcher: StructuredMatcher) -> set[int]:
    logits = torch.zeros(1, VOCAB)
    return set(torch.isfinite(apply_structured_outputs(logits, [matcher])[0]).nonzero()[:, 0].tolist())


def test_mask_allows_exactly_what_the_grammar_allows(compiler):
    matcher = StructuredMatcher(compiler.compile(StructuredOutputsParams(choice=["red", "green", "grey"])))
    assert _allowed(matcher) == {ord("r"), ord("g")}
    for byte in b"gre":
        assert matcher.accept(byte)
    assert _allowed(matcher) == {ord("e"), ord("y")}
    assert not matcher.accept(ord("x"))  # refused, and the matcher is unchanged
    for byte in b"en":
        assert matcher.accept(byte)
    assert _allowed(matcher) == {EOS}
    assert matcher.accept(EOS) and matcher.is_terminated


def test_rollback_returns_to_the_earlier_state(compiler):
    grammar = compiler.compile(StructuredOutputsParams(json=SCHEMA))
    text = list(b'{"id": 12, "tag": "b"')
    matcher = StructuredMatcher(grammar)
    for token in text:
        assert matcher.accept(token)
    matcher.rollback(5)
    fresh = StructuredMatcher(grammar)
    for token in text[:-5]:
        fresh.accept(token)
    assert _allowed(matcher) == _allowed(fresh) and matcher.num_accepted == len(text) - 5
    with pytest.raises(ValueError, match="rollback"):
        matcher.rollback(len(text))


def test_the_mask_leaves_other_rows_bit_identical(compiler):
    logits = torch.randn(4, VOCAB)
    matcher = StructuredMatcher(compiler.compile(StructuredOutputsParams(regex="[0-9]+")))
    masked = apply_structured_outputs(logits, [None, matcher, None, None])
    assert torch.equal(masked[[0, 2, 3]], logits[[0, 2, 3]])
    finite = torch.isfinite(masked[1]).nonzero()[:, 0].tolist()
    assert finite == list(range(ord("0"), ord("9") + 1))
    assert torch.equal(masked[1, finite], logits[1, finite])
    assert apply_structured_outputs(logits, [None] * 4) is logits
