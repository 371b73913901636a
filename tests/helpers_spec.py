"""Speculative-decoding test helpers: a drafter that knows the greedy continuation and errs on purpose."""

from __future__ import annotations

import random

from deltaserve import LLM

NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3, "auto_disable": False}


class OracleProposer:
    """Drafts from known full sequences (prompt + reference continuation): each draft is wrong with
    probability ``error_rate`` (then the rest of the step's drafts are cut after it), and a step has no
    drafts with probability ``skip_rate``; so verify steps accept all, some or none of their drafts."""

    def __init__(self, sequences: list[list[int]], error_rate: float = 0.3, skip_rate: float = 0.2, seed: int = 0):
        self.sequences = [list(s) for s in sequences]
        self.error_rate, self.skip_rate = error_rate, skip_rate
        self.rng = random.Random(seed)
        self.num_calls = 0

    def propose(self, seqs, num_tokens) -> list[list[int]]:
        self.num_calls += 1
        return [self._one(list(seq.token_ids), k) for seq, k in zip(seqs, num_tokens)]

    def _one(self, ids: list[int], k: int) -> list[int]:
        if k == 0 or self.rng.random() < self.skip_rate:
            return []
        for full in self.sequences:
            if full[: len(ids)] == ids:
                drafts = full[len(ids) : len(ids) + k]
                break
        else:
            return []
        out = []
        for token in drafts:
            if self.rng.random() < self.error_rate:
                out.append((token + 1) % 256)  # a wrong draft; later ones follow it
            else:
                out.append(token)
        return out


def spec_llm(checkpoint, speculative_config=NGRAM, proposer=None, **kwargs) -> LLM:
    """An LLM in float32 with ``speculative_config``; ``proposer`` replaces its drafter (tests only)."""
    kwargs.setdefault("block_size", 4)
    llm = LLM(model=str(checkpoint), dtype="float32", speculative_config=speculative_config, **kwargs)
    if proposer is not None:
        llm.llm_engine.runner.speculator.proposer = proposer
    return llm


def oracle_config(k: int = 3) -> dict:
    # NOTE: the proposer is swapped for an OracleProposer after construction; "ngram" only builds one.
    return {"method": "ngram", "num_speculative_tokens": k, "auto_disable": False}
