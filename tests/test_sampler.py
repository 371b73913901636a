"""Sampler vs naive float64 recomputations of temperature / top-k / top-p and logprobs."""

from __future__ import annotations

import math

import pytest
import torch

from deltaserve.engine.sampler import Sampler
from deltaserve.engine.sampling_params import SamplingParams

VOCAB = 6
LOGITS = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, 1.5])


def naive_probs(logits: list[float], temperature: float, top_k: int, top_p: float) -> list[float]:
    """Reference: per-token loop in float64."""
    scaled = [x / temperature for x in logits]
    order = sorted(range(len(scaled)), key=lambda i: -scaled[i])
    keep = set(order[:top_k] if top_k > 0 else order)
    z = sum(math.exp(scaled[i]) for i in keep)
    probs = {i: math.exp(scaled[i]) / z for i in keep}
    kept, mass = set(), 0.0
    for i in order:
        if i not in keep:
            continue
        if mass < top_p:
            kept.add(i)
        mass += probs[i]
    z = sum(probs[i] for i in kept)
    return [probs[i] / z if i in kept else 0.0 for i in range(len(logits))]


def frequencies(params: SamplingParams, draws: int = 6000) -> list[float]:
    sampler = Sampler(torch.Generator().manual_seed(1))
    out = sampler(LOGITS.repeat(draws, 1), [params] * draws, [None] * draws)
    counts = torch.bincount(torch.tensor([o.token_id for o in out]), minlength=VOCAB).double()
    return (counts / draws).tolist()


def test_greedy_is_argmax():
    logits = torch.randn(5, 50)
    out = Sampler()(logits, [SamplingParams(temperature=0)] * 5, [None] * 5)
    assert [o.token_id for o in out] == logits.argmax(-1).tolist()


def test_top_k_one_equals_greedy_at_any_temperature():
    logits = torch.randn(4, 50)
    out = Sampler()(logits, [SamplingParams(temperature=1.3, top_k=1)] * 4, [None] * 4)
    assert [o.token_id for o in out] == logits.argmax(-1).tolist()


@pytest.mark.parametrize(
    "temperature, top_k, top_p",
    [(1.0, -1, 1.0), (0.7, -1, 1.0), (1.0, 3, 1.0), (1.0, 0, 0.6), (1.5, 4, 0.8)],
)
def test_sample_frequencies_match_naive_distribution(temperature, top_k, top_p):
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
    expected = naive_probs(LOGITS.tolist(), temperature, top_k, top_p)
    observed = frequencies(params)
    for e, o in zip(expected, observed):
        assert abs(e - o) < 0.025, (expected, observed)
        if e == 0.0:
            assert o == 0.0  # masked tokens are never drawn


def test_seeded_row_does_not_depend_on_its_batch():
    logits = torch.randn(5, 40)
    seeded = SamplingParams(temperature=1.0, seed=7)

    def run(rows: list[int]) -> list[int]:
        gens = [torch.Generator().manual_seed(7) if r == 2 else None for r in rows]
        params = [seeded if r == 2 else SamplingParams(temperature=0.9) for r in rows]
        tokens = []
        for _ in range(20):
            out = Sampler(torch.Generator().manual_seed(len(rows)))(logits[rows], params, gens)
            tokens.append(out[rows.index(2)].token_id)
        return tokens

    alone = run([2])
    assert alone == run([0, 1, 2, 3, 4]) == run([4, 2])
    assert len(set(alone)) > 1  # it is sampling, not greedy


def test_logprobs_are_log_softmax_of_processed_logits():
    logits = torch.randn(3, 30)
    params = [
        SamplingParams(temperature=0, logprobs=3),
        SamplingParams(temperature=0.5, logprobs=2, seed=3),
        SamplingParams(temperature=1.0, top_k=5, logprobs=0, seed=4),
    ]
    gens = [None, torch.Generator().manual_seed(3), torch.Generator().manual_seed(4)]
    out = Sampler()(logits, params, gens)
    for row, (p, o) in enumerate(zip(params, out)):
        temperature = 1.0 if p.temperature == 0 else p.temperature
        probs = naive_probs(logits[row].double().tolist(), temperature, p.effective_top_k, p.top_p)
        expected = math.log(probs[o.token_id])
        assert abs(o.logprob - expected) < 1e-5
        assert o.top_logprobs[o.token_id].logprob == pytest.approx(expected, abs=1e-5)
        ranked = sorted(range(30), key=lambda i: -probs[i])
        assert o.top_logprobs[o.token_id].rank == ranked.index(o.token_id) + 1
        alternatives = {t for t, lp in o.top_logprobs.items() if lp.rank <= p.logprobs and t != o.token_id}
        assert alternatives <= set(ranked[: p.logprobs])
        assert len(o.top_logprobs) >= p.logprobs


def test_no_logprobs_asked_gives_none():
    out = Sampler()(torch.randn(2, 10), [SamplingParams(temperature=0)] * 2, [None] * 2)
    assert all(o.top_logprobs is None for o in out)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"temperature": -0.1}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"n": 0}, "n"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"logprobs": 21}, "logprobs"),
        ({"stop": [""]}, "stop"),
        ({"stop_token_ids": [-1]}, "stop_token_ids"),
        ({"seed": 1.5}, "seed"),
    ],
)
def test_sampling_params_validation_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"^{field} must"):
        SamplingParams(**kwargs)
