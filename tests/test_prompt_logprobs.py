"""Prompt logprobs against transformers' full forward (fp32): chunked prefill, prefix cache, n > 1."""

from __future__ import annotations

import pytest
import torch

from deltaserve import LLM, SamplingParams
from helpers_engine import assert_all_free, random_prompts
from helpers_model import make_checkpoint, reference_logits, reference_model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("prompt_logprobs"))


@pytest.fixture(scope="module")
def ref_model(checkpoint):
    return reference_model(checkpoint)


def expected_prompt_logprobs(ref_model, prompt: list[int]) -> torch.Tensor:
    """``[P - 1]``: log p(prompt[i] | prompt[:i]) for i = 1..P-1, from one full forward."""
    logprobs = torch.log_softmax(reference_logits(ref_model, prompt).double(), dim=-1)
    return logprobs[torch.arange(len(prompt) - 1), torch.tensor(prompt[1:])]


def check(output, ref_model, prompt: list[int], k: int) -> None:
    entries = output.prompt_logprobs
    assert entries is not None and len(entries) == len(prompt) and entries[0] is None
    expected = expected_prompt_logprobs(ref_model, prompt)
    got = torch.tensor([entries[i][prompt[i]].logprob for i in range(1, len(prompt))], dtype=torch.float64)
    assert (got - expected).abs().max().item() < 1e-4
    full = torch.log_softmax(reference_logits(ref_model, prompt).double(), dim=-1)
    for i in range(1, len(prompt)):
        top = full[i - 1].topk(k).indices.tolist()
        assert set(top) <= set(entries[i]), "the k best tokens are listed"
        assert entries[i][prompt[i]].rank == int((full[i - 1] > full[i - 1, prompt[i]] + 1e-6).sum()) + 1


def test_prompt_logprobs_equal_the_full_forward_over_chunked_prefill(checkpoint, ref_model):
    # A 16-token budget splits the 37-token prompt into three chunks that share the step with others.
    llm = LLM(model=str(checkpoint), dtype="float32", block_size=4, max_num_batched_tokens=16,
              enable_prefix_caching=False)
    prompts = random_prompts([37, 5, 2], seed=3)
    params = [SamplingParams(temperature=0, max_tokens=3, prompt_logprobs=2, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=3, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=3, prompt_logprobs=0, ignore_eos=True)]
    outputs = llm.generate(prompts, params, use_tqdm=False)
    check(outputs[0], ref_model, prompts[0], 2)
    assert outputs[1].prompt_logprobs is None
    check(outputs[2], ref_model, prompts[2], 0)
    assert_all_free(llm.get_metrics())


def test_a_request_with_prompt_logprobs_takes_no_prefix_hit_and_stays_exact(checkpoint, ref_model):
    llm = LLM(model=str(checkpoint), dtype="float32", block_size=4, max_num_batched_tokens=64,
              checkpoint_interval=64)
    (prompt,) = random_prompts([70], seed=4)
    llm.generate([prompt], SamplingParams(temperature=0, max_tokens=2, ignore_eos=True), use_tqdm=False)
    before = llm.get_metrics()
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=1, n=2,
                                                ignore_eos=True), use_tqdm=False)[0]
    check(out, ref_model, prompt, 1)
    after = llm.get_metrics()
    # Sequence 0 computes the whole prompt; sequence 1 (no prompt logprobs of its own) may hit.
    assert after["prompt_tokens_computed"] - before["prompt_tokens_computed"] >= len(prompt)
    assert len(out.outputs) == 2
    assert_all_free(after)
