"""The rejection sampler leaves the target distribution unchanged, whatever the drafts.

A bigram target over a tiny vocabulary (temperature and top-k applied), drafts from another bigram
(declared one-hot, as n-gram drafts, or with their probabilities): pairs of emitted tokens must follow
``p(x1 | s) p(x2 | x1)`` (chi-square bound), and a rule that accepts every draft must fail that bound.
"""

from __future__ import annotations

import torch

from deltaserve.engine.sampler import Sampler
from deltaserve.engine.sampling_params import SamplingParams
from deltaserve.spec_decode.rejection_sampler import RejectionSampler

VOCAB, K, TRIALS = 8, 3, 4000
# NOTE: the 0.999 quantile of chi-square with 15 degrees of freedom (16 cells: top_k = 4 per row).
CHI2_15_999 = 37.70
PARAMS = SamplingParams(temperature=0.8, top_k=4)


def tables(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Target logits ``[V, V]`` (row a: logits after token a), its processed probabilities, draft probs."""
    gen = torch.Generator().manual_seed(seed)
    logits = 1.5 * torch.randn(VOCAB, VOCAB, generator=gen)
    target = torch.softmax(Sampler.process_logits(logits, [PARAMS] * VOCAB), dim=-1)
    draft = torch.softmax(torch.randn(VOCAB, VOCAB, generator=gen), dim=-1)
    return logits, target, draft


def draw_drafts(draft: torch.Tensor, last: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """``[R, K]`` drafts, each from ``draft[previous token]``."""
    out, prev = [], last
    for _ in range(K):
        prev = torch.multinomial(draft[prev], 1, generator=gen)[:, 0]
        out.append(prev)
    return torch.stack(out, dim=1)


def generate_pairs(with_draft_probs: bool, always_accept: bool = False) -> torch.Tensor:
    """``[TRIALS, 2]``: the first two tokens after token 0, by verify steps until each trial has two."""
    logits_table, _, draft = tables()
    sampler = RejectionSampler(Sampler(torch.Generator().manual_seed(1)))
    gen = torch.Generator().manual_seed(2)
    emitted: list[list[int]] = [[] for _ in range(TRIALS)]
    while any(len(e) < 2 for e in emitted):
        rows = [i for i, e in enumerate(emitted) if len(e) < 2]
        last = torch.tensor([emitted[i][-1] if emitted[i] else 0 for i in rows])
        drafts = draw_drafts(draft, last, gen)  # [R, K]
        prefixes = torch.cat([last[:, None], drafts], dim=1)  # row j of a trial predicts after prefix j
        logits = logits_table[prefixes.reshape(-1)]
        out = sampler(
            logits, drafts.tolist(), [PARAMS] * len(rows), [None] * len(rows),
            draft_probs=draft[prefixes[:, :K]] if with_draft_probs else None,
            forced_num_accepted=[K] * len(rows) if always_accept else None,
        )  # fmt: skip
        for i, tokens in zip(rows, out):
            emitted[i].extend(t.token_id for t in tokens)
    return torch.tensor([e[:2] for e in emitted])


def chi_square(pairs: torch.Tensor) -> float:
    _, target, _ = tables()
    expected = TRIALS * target[0][:, None] * target  # [x1, x2]
    observed = torch.zeros(VOCAB, VOCAB)
    observed.index_put_((pairs[:, 0], pairs[:, 1]), torch.ones(len(pairs)), accumulate=True)
    support = expected > 0
    assert support.sum() == 16
    if observed[~support].sum() > 0:
        return float("inf")  # a token outside top-k was emitted
    return float(((observed - expected)[support] ** 2 / expected[support]).sum())


def test_sampled_pairs_follow_the_target_with_one_hot_drafts():
    assert chi_square(generate_pairs(with_draft_probs=False)) < CHI2_15_999


def test_sampled_pairs_follow_the_target_with_draft_probabilities():
    assert chi_square(generate_pairs(with_draft_probs=True)) < CHI2_15_999


def test_the_bound_rejects_a_sampler_that_accepts_every_draft():
    assert chi_square(generate_pairs(with_draft_probs=False, always_accept=True)) > 10 * CHI2_15_999


def test_greedy_accepts_the_argmax_chain_and_replaces_the_first_mismatch():
    logits_table, _, _ = tables()
    chain = [0]
    for _ in range(3):
        chain.append(int(logits_table[chain[-1]].argmax()))
    drafts = [chain[1], chain[2], (chain[3] + 1) % VOCAB]  # the third draft is wrong
    prefixes = [0] + drafts
    out = RejectionSampler(Sampler())(
        logits_table[prefixes], [drafts], [SamplingParams(temperature=0.0)], [None]
    )[0]
    assert [t.token_id for t in out] == chain[1:4]
    expected_logprobs = torch.log_softmax(logits_table[prefixes[:3]], dim=-1)[range(3), chain[1:4]]
    assert torch.allclose(torch.tensor([t.logprob for t in out]), expected_logprobs)


def test_a_seeded_row_does_not_depend_on_its_batch():
    logits_table, _, _ = tables()
    drafts = [[1, 2, 3], [4, 5, 6], [7, 0, 1]]
    logits = logits_table[torch.tensor([[0] + d for d in drafts]).reshape(-1)]
    sampler = RejectionSampler(Sampler(torch.Generator().manual_seed(5)))
    params = [SamplingParams(temperature=1.0, seed=9)] * 3

    def seeded() -> torch.Generator:
        return torch.Generator().manual_seed(9)

    alone = sampler(logits[4:8], drafts[1:2], params[:1], [seeded()])[0]
    batched = sampler(logits, drafts, params, [None, seeded(), None])[1]
    assert [t.token_id for t in alone] == [t.token_id for t in batched]
