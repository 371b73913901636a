"""Sampled tokens with speculation follow the model's distribution (top-k and temperature applied).

The tiny Kimi-Linear model, one prompt, many sequences: the pair (first token, second token) — the
second one emitted by a verify step, from an accepted draft or a resampled rejection — is compared
with the exact distribution from transformers' logits by a chi-square bound; so is decoding without
drafts, with the same bound.
"""

from __future__ import annotations

import pytest
import torch

from deltaserve import LLM, SamplingParams
from deltaserve.engine.sampler import Sampler
from helpers_model import make_checkpoint, reference_logits, reference_model
from helpers_spec import oracle_config

PROMPT = [17, 99, 4, 230, 61]
PARAMS = SamplingParams(n=25, temperature=1.3, top_k=4, max_tokens=3, ignore_eos=True)
NUM_REQUESTS = 40  # 1000 sequences
# NOTE: the 0.999 quantile of chi-square with 15 degrees of freedom (4 x 4 cells of top-k = 4).
CHI2_15_999 = 37.70


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    checkpoint = make_checkpoint(tmp_path_factory.mktemp("spec_sampling"))
    ref = reference_model(checkpoint)

    def probs(tokens: list[int]) -> torch.Tensor:
        logits = reference_logits(ref, tokens)[-1:]
        return torch.softmax(Sampler.process_logits(logits, [PARAMS]), dim=-1)[0]

    first = probs(PROMPT)
    support = first.nonzero()[:, 0].tolist()
    second = {x: probs(PROMPT + [x]) for x in support}
    expected = {(a, b): first[a].item() * second[a][b].item() for a in support for b in second[a].nonzero()[:, 0].tolist()}
    # Drafts: the likeliest second token (often accepted), then an unlikely one (often rejected).
    guesses = {x: [int(second[x].argmax()), int(second[x].argmin())] for x in support}
    return checkpoint, expected, guesses


class GuessProposer:
    def __init__(self, guesses: dict[int, list[int]]):
        self.guesses = guesses

    def propose(self, seqs, num_tokens):
        return [self.guesses.get(s.token_ids[-1], [])[:k] if s.num_tokens == len(PROMPT) + 1 else []
                for s, k in zip(seqs, num_tokens)]  # fmt: skip


def sample_pairs(checkpoint, speculative_config=None, proposer=None) -> tuple[dict, LLM]:
    llm = LLM(model=str(checkpoint), dtype="float32", seed=7, speculative_config=speculative_config,
              enable_prefix_caching=False)  # fmt: skip
    if proposer is not None:
        llm.llm_engine.runner.speculator.proposer = proposer
    counts: dict[tuple[int, int], int] = {}
    for out in llm.generate([PROMPT] * NUM_REQUESTS, PARAMS, use_tqdm=False):
        for completion in out.outputs:
            pair = tuple(completion.token_ids[:2])
            counts[pair] = counts.get(pair, 0) + 1
    return counts, llm


def chi_square(counts: dict, expected: dict) -> float:
    total = sum(counts.values())
    if set(counts) - set(expected):
        return float("inf")  # a pair outside top-k
    return sum((counts.get(cell, 0) - total * p) ** 2 / (total * p) for cell, p in expected.items())


def test_sampled_pairs_with_drafts_follow_the_model_distribution(setup):
    checkpoint, expected, guesses = setup
    assert len(expected) == 16
    counts, llm = sample_pairs(checkpoint, oracle_config(k=2), GuessProposer(guesses))
    stats = llm.get_metrics()
    # Most second tokens went through a verify step, accepting some drafts and rejecting others.
    assert stats["spec_decode_num_drafts"] == NUM_REQUESTS * PARAMS.n
    assert 0 < stats["spec_decode_num_accepted_tokens"] < stats["spec_decode_num_draft_tokens"]
    assert chi_square(counts, expected) < CHI2_15_999


def test_sampled_pairs_without_drafts_follow_the_same_bound(setup):
    checkpoint, expected, _ = setup
    counts, _ = sample_pairs(checkpoint)
    assert chi_square(counts, expected) < CHI2_15_999
