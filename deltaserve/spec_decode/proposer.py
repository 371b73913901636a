"""Drafters: what proposes the next ``k`` tokens of a sequence before the target model checks them.

A proposer sees sequences between steps (``seq.token_ids`` ends with the last sampled token, not yet
computed) and returns up to ``num_tokens[i]`` draft tokens for each; an empty list means no drafts
(the sequence then decodes one token as without speculation). A proposer that runs a model on the
step's hidden states (MTP) also has ``observe(step)``, called after every step.
"""

from __future__ import annotations

import random
from typing import Protocol, Sequence as Seq

import torch

from deltaserve.spec_decode.config import SpeculativeConfig


class Proposer(Protocol):
    def propose(self, seqs: Seq, num_tokens: Seq[int]) -> list[list[int]]:
        """Up to ``num_tokens[i]`` drafts following ``seqs[i].token_ids`` (any list may come back empty)."""
        ...


class NgramProposer:
    """Prompt lookup (vLLM's ``method="ngram"``): find the sequence's last ``n`` tokens earlier in it
    (``n`` from ``prompt_lookup_max`` down to ``prompt_lookup_min``, latest occurrence first) and
    propose the tokens that followed them there."""

    def __init__(self, prompt_lookup_min: int, prompt_lookup_max: int):
        self.min_n, self.max_n = prompt_lookup_min, prompt_lookup_max

    def propose(self, seqs: Seq, num_tokens: Seq[int]) -> list[list[int]]:
        return [self._propose_one(seq.token_ids, k) if k > 0 else [] for seq, k in zip(seqs, num_tokens)]

    def _propose_one(self, ids: list[int], k: int) -> list[int]:
        length = len(ids)
        if length < self.min_n + 1:
            return []
        tokens = torch.tensor(ids, dtype=torch.int64)
        for n in range(min(self.max_n, length - 1), self.min_n - 1, -1):
            # Windows starting at 0..length-n-1: every n-gram but the suffix itself.
            windows = tokens[:-1].unfold(0, n, 1)  # [length - n, n]
            hits = (windows == tokens[-n:]).all(dim=1).nonzero()
            if hits.numel():
                start = int(hits[-1]) + n
                return ids[start : start + k]
        return []


class SyntheticProposer:
    """Benchmark drafts: ``k`` copies of the last token. Their acceptance is forced by
    :class:`SyntheticAcceptance`, so the verify cost is real whatever the model's weights."""

    def propose(self, seqs: Seq, num_tokens: Seq[int]) -> list[list[int]]:
        return [[seq.token_ids[-1]] * k for seq, k in zip(seqs, num_tokens)]


class SyntheticAcceptance:
    """Accepted drafts per verify row with mean ``acceptance_length - 1``: ``floor`` or ``ceil`` of
    it, the ``ceil`` on a fraction of the rows equal to the fractional part, spread by carrying the
    remainder from row to row (error diffusion), so that the realised mean is the asked one within
    one row in every run, short runs too (a draw at random per row, as SGLang's simulated
    acceptance, measured 3.23 for 3.4 over ~40 steps). Rows with fewer drafts accept all of them.

    ``seed`` sets where the carry starts (runs with different seeds spread the ``ceil`` rows differently).
    """

    def __init__(self, acceptance_length: float, seed: int = 0):
        self.mean_accepted = acceptance_length - 1.0
        self.carry = random.Random(seed).random()

    def num_accepted(self, num_drafts: Seq[int]) -> list[int]:
        base = int(self.mean_accepted)
        frac = self.mean_accepted - base
        out = []
        for k in num_drafts:
            self.carry += frac
            extra = self.carry >= 1.0
            self.carry -= extra
            out.append(min(k, base + extra))
        return out


def make_proposer(config: SpeculativeConfig, runner=None) -> Proposer:
    """The proposer of ``config.method``; ``mtp`` needs the model runner (its drafter runs on the device)."""
    if config.method == "ngram":
        return NgramProposer(config.prompt_lookup_min, config.prompt_lookup_max)
    if config.method == "synthetic":
        return SyntheticProposer()
    if config.method == "mtp":
        from deltaserve.spec_decode.mtp import MTPProposer

        return MTPProposer(config, runner)
    raise ValueError(f"speculative_config: method must be one of ngram, mtp, synthetic; got {config.method!r}")
