"""Prompt logprobs: the logprob of every prompt token given the ones before it, chunk by chunk.

The logits at prompt position ``p`` score token ``p + 1``; a sequence asking for them gets the
logits of all its prompt positions in every (chunked) prefill step, and ``seq.prompt_logprobs``
grows by one entry per position (its first entry, for token 0, is ``None``). Positions already
scored are skipped, so a sequence recomputed after a preemption does not score them twice; such a
sequence never takes a prefix-cache hit (the scheduler skips the lookup), so every position is
computed.
"""

from __future__ import annotations

from typing import Any, Iterator

import torch

from deltaserve.engine.sampler import top_logprob_entries

# NOTE: logits are computed this many positions at a time ([rows, vocab] float32 each).
ROWS_PER_SLICE = 256


def prompt_positions(batch: Any) -> list[tuple[Any, int, int]]:
    """``(seq, flat row of its first position to score, number of positions)`` for this batch."""
    out, offset = [], 0
    for seq, num_new in zip(batch.seqs, batch.num_new_tokens):
        if seq.prompt_logprobs is not None:
            start = seq.num_computed_tokens
            done = len(seq.prompt_logprobs) - 1  # positions 0..done-1 are scored
            first, end = max(start, done), min(start + num_new, seq.num_prompt_tokens - 1)
            if first < end:
                if first != done:
                    raise RuntimeError(f"prompt logprobs of {seq} would skip positions {done}..{first - 1}")
                out.append((seq, offset + first - start, end - first))
        offset += num_new
    return out


def prompt_rows(batch: Any) -> list[int]:
    """The flat rows of ``batch`` whose logits score prompt tokens, in the order they are scored."""
    return _rows(prompt_positions(batch))


def _rows(spans: list[tuple[Any, int, int]]) -> list[int]:
    return [r for _, row, count in spans for r in range(row, row + count)]


def prompt_logits(model: Any, hidden: torch.Tensor, rows: list[int]) -> Iterator[torch.Tensor]:
    """float32 logits of ``hidden[rows]``, ``ROWS_PER_SLICE`` rows at a time (every TP rank runs the
    same slices: ``compute_logits`` gathers the vocabulary)."""
    for begin in range(0, len(rows), ROWS_PER_SLICE):
        yield model.compute_logits(hidden[torch.tensor(rows[begin : begin + ROWS_PER_SLICE], device=hidden.device)])


@torch.inference_mode()
def collect_prompt_logprobs(model: Any, hidden: torch.Tensor, batch: Any) -> None:
    """Append this step's prompt-logprob entries to each asking sequence (in place).

    ``hidden``: ``[T, hidden]``, the flat batch's last hidden states; ``model.compute_logits`` maps
    rows of it to float32 logits. Entries come from the raw logits (no sampling settings applied).
    """
    spans = prompt_positions(batch)
    if not spans:
        return
    targets, want, owners = [], [], []
    for seq, _, count in spans:
        first = len(seq.prompt_logprobs) - 1
        targets.extend(seq.token_ids[first + 1 : first + 1 + count])
        want.extend([seq.params.prompt_logprobs] * count)
        owners.extend([seq] * count)
    device = hidden.device
    for begin, logits in zip(range(0, len(targets), ROWS_PER_SLICE), prompt_logits(model, hidden, _rows(spans))):
        end = begin + ROWS_PER_SLICE
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        token_ids = torch.tensor(targets[begin:end], device=device)
        for seq, entry in zip(owners[begin:end], top_logprob_entries(logprobs, token_ids, want[begin:end])):
            seq.prompt_logprobs.append(entry)
