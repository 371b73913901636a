"""The per-row transformations of the sampler, each one batched tensor op over ``[S, V]`` logits.

Order (vLLM's): ``min_tokens`` masking, ``logit_bias``, penalties (these change greedy decoding
too), then, for sampling rows only, temperature, ``min_p``, top-k and top-p. ``SamplingTensors``
gathers the per-row settings once per step (one host list per setting, no per-token loop).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from deltaserve.engine.sampling_params import SamplingParams
from deltaserve.forward_context import host_to_device


@dataclass
class SamplingTensors:
    """Per-row settings of one step on the logits' device; ``None`` where no row uses a transformation.

    ``min_tokens_mask``: ``(rows, token ids)`` to set to ``-inf``; ``logit_bias``: ``(rows, ids, bias)``;
    penalties: ``prompt_mask`` / ``output_counts`` ``[S, V]`` and one factor per row.
    """

    min_tokens_mask: tuple[torch.Tensor, torch.Tensor] | None = None
    logit_bias: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    prompt_mask: torch.Tensor | None = None
    output_counts: torch.Tensor | None = None
    repetition_penalty: torch.Tensor | None = None
    presence_penalty: torch.Tensor | None = None
    frequency_penalty: torch.Tensor | None = None

    @classmethod
    def build(cls, params: Sequence[SamplingParams], histories: Sequence[Any] | None, eos_token_ids: set[int],
              vocab: int, device: torch.device) -> "SamplingTensors":
        """``histories[i]`` has ``token_ids`` and ``num_prompt_tokens`` (a ``Sequence``), or is None."""
        out = cls()
        rows, cols = [], []
        for row, p in enumerate(params):
            history = histories[row] if histories is not None else None
            if p.min_tokens and history is not None and history.num_tokens - history.num_prompt_tokens < p.min_tokens:
                stop_ids = set(p.stop_token_ids) | (set() if p.ignore_eos else set(eos_token_ids))
                ids = [t for t in stop_ids if t < vocab]
                rows += [row] * len(ids)
                cols += ids
        if rows:
            out.min_tokens_mask = (host_to_device(rows, device), host_to_device(cols, device))
        rows, cols, biases = [], [], []
        for row, p in enumerate(params):
            for token, bias in (p.logit_bias or {}).items():
                rows.append(row), cols.append(token), biases.append(float(bias))
        if rows:
            out.logit_bias = (host_to_device(rows, device), host_to_device(cols, device),
                              host_to_device(biases, device, torch.float32))
        if histories is not None and any(p.has_penalties for p in params):
            prompts = [h.token_ids[: h.num_prompt_tokens] if h is not None else [] for h in histories]
            outputs = [h.token_ids[h.num_prompt_tokens:] if h is not None else [] for h in histories]
            out.prompt_mask = token_counts(prompts, vocab, device) > 0
            out.output_counts = token_counts(outputs, vocab, device)

            def per_row(name: str) -> torch.Tensor:
                return host_to_device([float(getattr(p, name)) for p in params], device, torch.float32)

            out.repetition_penalty = per_row("repetition_penalty")
            out.presence_penalty = per_row("presence_penalty")
            out.frequency_penalty = per_row("frequency_penalty")
        return out


def token_counts(token_lists: list[list[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """``[S, V]`` float32: how often each token id occurs in each row's list (one scatter-add)."""
    longest = max((len(t) for t in token_lists), default=0)
    counts = torch.zeros(len(token_lists), vocab + 1, dtype=torch.float32, device=device)
    if longest == 0:
        return counts[:, :vocab]
    # NOTE: rows are padded with the id ``vocab``, a column that is dropped afterwards.
    padded = torch.full((len(token_lists), longest), vocab, dtype=torch.int64)
    for row, tokens in enumerate(token_lists):
        padded[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.int64)
    padded = padded.to(device, non_blocking=True)
    counts.scatter_add_(1, padded, torch.ones_like(padded, dtype=torch.float32))
    return counts[:, :vocab]


def apply_min_tokens(logits: torch.Tensor, mask: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    """Stop tokens (EOS, ``stop_token_ids``) of rows below ``min_tokens`` become ``-inf``."""
    if mask is None:
        return logits
    logits = logits.clone()
    logits[mask[0], mask[1]] = float("-inf")
    return logits


def apply_logit_bias(logits: torch.Tensor, bias: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    """``logits[row, token] += bias`` for every ``logit_bias`` entry."""
    if bias is None:
        return logits
    return logits.index_put((bias[0], bias[1]), bias[2], accumulate=True)


def apply_penalties(logits: torch.Tensor, t: SamplingTensors) -> torch.Tensor:
    """vLLM's penalties: tokens seen in prompt or output get their logit divided by the repetition
    penalty when positive (multiplied when not); then ``- frequency * count - presence * (count > 0)``
    over the output's tokens."""
    if t.output_counts is None:
        return logits
    seen = t.prompt_mask | (t.output_counts > 0)
    penalty = torch.where(seen, t.repetition_penalty[:, None], torch.ones_like(logits))
    logits = torch.where(logits > 0, logits / penalty, logits * penalty)
    logits = logits - t.frequency_penalty[:, None] * t.output_counts
    return logits - t.presence_penalty[:, None] * (t.output_counts > 0)


def apply_temperature(logits: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """``temperature``: ``[S]`` (1 for greedy rows)."""
    return logits / temperature[:, None]


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor | None) -> torch.Tensor:
    """Tokens whose probability is below ``min_p`` times the row's highest become ``-inf``;
    ``min_p`` None: no row uses it."""
    if min_p is None:
        return logits
    probs = torch.softmax(logits, dim=-1)
    threshold = probs.amax(dim=-1, keepdim=True) * min_p[:, None]
    return logits.masked_fill(probs < threshold, float("-inf"))


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None) -> torch.Tensor:
    """Keep each row's ``top_k`` best (``top_k >= V`` is off), then the smallest set whose probability
    reaches ``top_p`` (the first token always). None: no row uses it (decided on the host, so that
    no device sync is needed). Returns a new tensor."""
    if top_k is None and top_p is None:
        return logits
    vocab = logits.shape[-1]
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    if top_k is not None:
        rank = torch.arange(vocab, device=logits.device)
        sorted_logits = sorted_logits.masked_fill(rank[None, :] >= top_k[:, None], float("-inf"))
    if top_p is not None:
        sorted_probs = torch.softmax(sorted_logits, dim=-1)
        # Keep a token while the probability of the tokens before it is below top_p (the first always).
        before = sorted_probs.cumsum(dim=-1) - sorted_probs
        sorted_logits = sorted_logits.masked_fill(before >= top_p[:, None], float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)
