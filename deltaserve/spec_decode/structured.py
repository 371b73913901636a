"""Structured outputs in a verify step: each position's logits masked by the grammar after the drafts before it.

A sequence's matcher is advanced through its drafts while the grammar allows them, filling the
bitmask of each verify position on the way, then rolled back (``rollback``): the tokens the step
keeps are accepted again as they are appended. A draft the grammar refuses has probability 0 under
its masked row, so the rejection sampler rejects it; the rows after it are never reached. Rows after
an accepted stop token stay unmasked: the stop check ends the sequence at that token.
"""

from __future__ import annotations

from typing import Sequence

import torch


def mask_verify_logits(logits: torch.Tensor, matchers: Sequence, draft_token_ids: Sequence[list[int]]) -> torch.Tensor:
    """``logits [sum(1 + k_i), V]`` of the verify rows with each constrained sequence's rows masked.

    Returns ``logits`` itself when no sequence is constrained, else a masked copy. Every matcher is
    left as it was.
    """
    if all(m is None for m in matchers):
        return logits
    import xgrammar as xgr

    num_rows, vocab = logits.shape
    bitmask = xgr.allocate_token_bitmask(num_rows, vocab)
    rows: list[int] = []
    start = 0
    for matcher, drafts in zip(matchers, draft_token_ids):
        if matcher is not None:
            advanced = 0
            for j in range(len(drafts) + 1):
                # NOTE: after an accepted stop token the sequence ends there: later rows stay unmasked.
                if matcher.is_terminated:
                    break
                matcher.fill_bitmask(bitmask, start + j)
                rows.append(start + j)
                if j < len(drafts) and advanced == j and matcher.accept(drafts[j]):
                    advanced += 1
            matcher.rollback(advanced)
        start += len(drafts) + 1
    masked = logits.clone()
    xgr.apply_token_bitmask_inplace(masked, bitmask.to(logits.device, non_blocking=True), vocab_size=vocab, indices=rows)
    return masked
