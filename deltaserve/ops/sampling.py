"""Sampling ops over a batch of logits rows, dispatched to ``deltaserve/ops/gpu/sampling.py`` on CUDA.

:func:`greedy_sample`: each row's arg-max token and its logprob, what an all-greedy step that asks
for no top logprobs needs of the vocabulary-wide rows (the sampler, ``deltaserve.engine.sampler``).
"""

from __future__ import annotations

import torch

from deltaserve.ops import dispatch


def greedy_sample_ref(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch reference of :func:`greedy_sample`: ``argmax``, then ``log_softmax`` gathered at it."""
    token_ids = logits.argmax(dim=-1)
    logprobs = torch.log_softmax(logits.float(), dim=-1).gather(1, token_ids[:, None])[:, 0]
    return token_ids, logprobs


def greedy_sample(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``logits [S, V]`` -> (token ids ``[S]`` int64: each row's arg-max, the lowest index among ties;
    their logprobs ``[S]`` float32, ``x[t] - logsumexp(x)`` of the row in float32)."""
    if logits.dim() != 2:
        raise ValueError(f"greedy_sample: logits must be [S, V], got {tuple(logits.shape)}")
    return dispatch("sampling", "greedy_sample", logits, greedy_sample_ref)(logits)
