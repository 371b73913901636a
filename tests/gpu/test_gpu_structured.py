"""Structured outputs on the GPU: the bitmask applied by xgrammar's CUDA path masks exactly as the CPU
path does, and a constrained batch on CUDA (CUDA graphs on) returns schema-valid JSON."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("triton")
pytest.importorskip("xgrammar")
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

jsonschema = pytest.importorskip("jsonschema")

from deltaserve import LLM, SamplingParams, StructuredOutputsParams  # noqa: E402
from deltaserve.models.tiny import make_tokenizer  # noqa: E402
from deltaserve.structured import GrammarCompiler, StructuredMatcher, apply_structured_outputs  # noqa: E402

SCHEMA = {"type": "object", "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 99},
                                           "tag": {"enum": ["a", "b"]}},
          "required": ["id", "tag"], "additionalProperties": False}


def test_cuda_mask_equals_the_cpu_mask():
    compiler = GrammarCompiler(make_tokenizer(), 320, [257])
    grammar = compiler.compile(StructuredOutputsParams(json=SCHEMA))
    logits = torch.randn(3, 320)
    matchers = [StructuredMatcher(grammar), None, StructuredMatcher(grammar)]
    matchers[2].accept(ord("{"))
    on_cpu = apply_structured_outputs(logits, matchers)
    on_gpu = apply_structured_outputs(logits.cuda(), matchers)
    assert torch.equal(on_gpu.cpu(), on_cpu)


def test_constrained_batch_on_cuda():
    llm = LLM(dtype="float32", device="cuda", max_model_len=512, max_num_seqs=8)
    free = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    params = [free] + [SamplingParams(temperature=1.0, seed=s, max_tokens=300, structured_outputs={"json": SCHEMA})
                       for s in range(6)]
    outs = [o.outputs[0] for o in llm.generate(["The state"] + ["x"] * 6, params, use_tqdm=False)]
    assert len(outs[0].token_ids) == 16
    for out in outs[1:]:
        assert out.finish_reason == "stop", out.text
        jsonschema.validate(json.loads(out.text), SCHEMA)
