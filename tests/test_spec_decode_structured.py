"""Structured outputs with speculative decoding: the grammar masks every verify position (the matcher
advanced through the drafts before it, then rolled back), so greedy constrained outputs equal those
without drafts, refused drafts are rejected, and sampled outputs still match the grammar."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from deltaserve import LLM, SamplingParams
from helpers_spec import OracleProposer, oracle_config

SCHEMA = {
    "type": "object",
    "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 999}, "tag": {"enum": ["a", "b", "c"]}},
    "required": ["id", "tag"],
    "additionalProperties": False,
}
REGEX = r"[a-z]{2,5}-[0-9]{2}"
PROMPTS = ["Describe a record:", "A code:"]


@pytest.fixture(scope="module")
def plain():
    return LLM(dtype="float32", max_model_len=256)


def constrained(temperature: float = 0.0, seed: int | None = None) -> list[SamplingParams]:
    return [SamplingParams(temperature=temperature, seed=seed, max_tokens=60, structured_outputs={"json": SCHEMA}),
            SamplingParams(temperature=temperature, seed=seed, max_tokens=30, structured_outputs={"regex": REGEX})]


def test_greedy_constrained_outputs_with_drafts_equal_those_without(plain):
    expected = [o.outputs[0] for o in plain.generate(PROMPTS, constrained(), use_tqdm=False)]
    tokenizer = plain.get_tokenizer()
    sequences = [tokenizer.encode(p) + e.token_ids for p, e in zip(PROMPTS, expected)]
    # Wrong drafts ((t + 1) % 256) are mostly refused by the grammar: rejected like any other.
    llm = LLM(dtype="float32", max_model_len=256, speculative_config=oracle_config())
    llm.llm_engine.runner.speculator.proposer = OracleProposer(sequences, error_rate=0.3)
    got = [o.outputs[0] for o in llm.generate(PROMPTS, constrained(), use_tqdm=False)]
    assert [g.token_ids for g in got] == [e.token_ids for e in expected]
    if got[0].finish_reason == "stop":
        jsonschema.validate(json.loads(got[0].text), SCHEMA)
    assert got[1].finish_reason == "stop" and re.fullmatch(REGEX, got[1].text)
    stats = llm.get_metrics()
    assert stats["spec_decode_num_draft_tokens"] > stats["spec_decode_num_accepted_tokens"] > 0


def test_sampled_constrained_outputs_with_ngram_drafts_match_the_grammar():
    llm = LLM(dtype="float32", max_model_len=256,
              speculative_config={"method": "ngram", "num_speculative_tokens": 3, "auto_disable": False})  # fmt: skip
    for seed in range(3):
        json_out, regex_out = (o.outputs[0] for o in llm.generate(PROMPTS, constrained(1.0, seed), use_tqdm=False))
        if json_out.finish_reason == "stop":
            jsonschema.validate(json.loads(json_out.text), SCHEMA)
        assert regex_out.finish_reason != "stop" or re.fullmatch(REGEX, regex_out.text)
    assert llm.get_metrics()["spec_decode_num_draft_tokens"] > 0
