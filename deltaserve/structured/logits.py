"""The sampler's hook: mask the logits of constrained rows to the tokens their grammars allow."""

from __future__ import annotations

from typing import Sequence

import torch

from deltaserve.structured.matcher import StructuredMatcher


def apply_structured_outputs(logits: torch.Tensor, matchers: Sequence[StructuredMatcher | None] | None) -> torch.Tensor:
    """``logits`` ``[S, V]`` with disallowed tokens of constrained rows at ``-inf``.

    Returns ``logits`` itself when no row is constrained, else a copy: one masked op over the
    constrained rows; other rows are copied bit for bit. The bitmask is filled on the CPU and moved
    to the logits' device once.
    """
    if not matchers:
        return logits
    rows = [row for row, matcher in enumerate(matchers) if matcher is not None]
    if not rows:
        return logits
    import xgrammar as xgr

    num_rows, vocab = logits.shape
    bitmask = xgr.allocate_token_bitmask(num_rows, vocab)
    for row in rows:
        matchers[row].fill_bitmask(bitmask, row)
    masked = logits.clone()
    xgr.apply_token_bitmask_inplace(masked, bitmask.to(logits.device, non_blocking=True), vocab_size=vocab, indices=rows)
    return masked
