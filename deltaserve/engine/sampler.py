"""Greedy / temperature / top-k / top-p sampling of one token per row, vectorised over the batch."""

from __future__ import annotations

from typing import NamedTuple

import torch

from deltaserve.engine.outputs import Logprob
from deltaserve.engine.sampling_params import SamplingParams
from deltaserve.structured.logits import apply_structured_outputs


class SampledToken(NamedTuple):
    """One row's result: the token, its logprob, and the top alternatives (``None`` if not asked)."""

    token_id: int
    logprob: float
    top_logprobs: dict[int, Logprob] | None


class Sampler:
    """Samples with per-row settings; rows without their own generator share ``generator``.

    Logprobs come from ``log_softmax`` in float32 of the processed logits (temperature, top-k,
    top-p applied); greedy rows (temperature 0 or top-k 1) use the raw logits.
    """

    def __init__(self, generator: torch.Generator | None = None):
        self.generator = generator

    @torch.inference_mode()
    def __call__(
        self,
        logits: torch.Tensor,
        params: list[SamplingParams],
        generators: list[torch.Generator | None],
        structured: list | None = None,
    ) -> list[SampledToken]:
        """``logits``: ``[S, V]``; ``params`` and ``generators``: one per row. Does not modify ``logits``.

        ``structured``: per row a ``StructuredMatcher`` or None; constrained rows sample only what
        their grammar allows (greedy, sampled and logprobs alike), the other rows are untouched.
        """
        if logits.dim() != 2 or logits.shape[0] != len(params) or len(generators) != len(params):
            raise ValueError(
                f"logits must be [S, V] with S = len(params) = len(generators); got {tuple(logits.shape)}, "
                f"{len(params)} params, {len(generators)} generators"
            )
        num_rows, vocab = logits.shape
        device = logits.device
        logits = apply_structured_outputs(logits.float(), structured)
        processed = self.process_logits(logits, params)

        token_ids = logits.argmax(dim=-1)
        if not all(p.is_greedy for p in params):
            probs = torch.softmax(processed, dim=-1)
            greedy = torch.tensor([p.is_greedy for p in params], device=device)
            token_ids = torch.where(greedy, token_ids, (probs / self.exponential_noise(probs, generators)).argmax(dim=-1))

        return self.outputs(processed, token_ids, params)

    def exponential_noise(self, probs: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
        """``E ~ Exp(1)`` shaped as ``probs [S, V]``: ``argmax(probs / E)`` is a draw from each row.

        NOTE: the exponential race; each seeded row draws its own ``E`` from its generator, so its
        tokens do not depend on the rest of the batch.
        """
        noise = torch.empty_like(probs).exponential_(generator=self.generator)
        for row, generator in enumerate(generators):
            if generator is not None:
                noise[row].exponential_(generator=generator)
        return noise

    @staticmethod
    def outputs(processed: torch.Tensor, token_ids: torch.Tensor, params: list[SamplingParams]) -> list[SampledToken]:
        """Each row's chosen token with its logprob (and top logprobs where asked) from ``processed [S, V]``."""
        num_rows, vocab = processed.shape
        logprobs = torch.log_softmax(processed, dim=-1)
        chosen = logprobs.gather(1, token_ids[:, None])[:, 0]
        want = [p.logprobs for p in params]
        tops: list[dict[int, Logprob] | None] = [None] * num_rows
        if any(k is not None for k in want):
            ranks = ((logprobs > chosen[:, None]).sum(dim=-1) + 1).tolist()
            k_max = max(k for k in want if k is not None)
            top_values, top_ids = logprobs.topk(min(k_max, vocab), dim=-1) if k_max > 0 else (None, None)
            top_values = top_values.tolist() if top_values is not None else None
            top_ids = top_ids.tolist() if top_ids is not None else None
            chosen_list, token_list = chosen.tolist(), token_ids.tolist()
            for row, k in enumerate(want):
                if k is None:
                    continue
                entry = {token_list[row]: Logprob(chosen_list[row], ranks[row])}
                for rank in range(k):
                    token = top_ids[row][rank]
                    if token not in entry:
                        entry[token] = Logprob(top_values[row][rank], rank + 1)
                tops[row] = entry
        return [SampledToken(t, lp, top) for t, lp, top in zip(token_ids.tolist(), chosen.tolist(), tops)]

    @staticmethod
    def process_logits(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
        """Temperature, then top-k, then top-p; masked logits become ``-inf``. Returns a new tensor."""
        num_rows, vocab = logits.shape
        device = logits.device
        temperature = torch.tensor(
            [1.0 if p.is_greedy else float(p.temperature) for p in params], dtype=logits.dtype, device=device
        )
        processed = logits / temperature[:, None]
        sampling = [not p.is_greedy for p in params]
        top_k = [p.effective_top_k if s and p.effective_top_k > 0 else vocab for p, s in zip(params, sampling)]
        top_p = [float(p.top_p) if s else 1.0 for p, s in zip(params, sampling)]
        if all(k >= vocab for k in top_k) and all(p >= 1.0 for p in top_p):
            return processed
        sorted_logits, order = processed.sort(dim=-1, descending=True)
        rank = torch.arange(vocab, device=device)
        mask = rank[None, :] >= torch.tensor(top_k, device=device)[:, None]
        sorted_logits = sorted_logits.masked_fill(mask, float("-inf"))
        if any(p < 1.0 for p in top_p):
            sorted_probs = torch.softmax(sorted_logits, dim=-1)
            # Keep a token while the probability of the tokens before it is below top_p (the first always).
            before = sorted_probs.cumsum(dim=-1) - sorted_probs
            mask = before >= torch.tensor(top_p, dtype=logits.dtype, device=device)[:, None]
            sorted_logits = sorted_logits.masked_fill(mask, float("-inf"))
        return torch.empty_like(processed).scatter_(1, order, sorted_logits)
