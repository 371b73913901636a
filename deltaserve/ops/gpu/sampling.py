"""Greedy sampling in one pass over the logits (same contract as :mod:`deltaserve.ops.sampling`).

Each program streams a chunk of a row once, keeping its maximum, the first index reaching it, and the
sum of ``exp(x - max)`` rescaled as the maximum grows; a second launch merges a row's chunks. The row
is read once, where ``log_softmax`` + ``argmax`` + ``gather`` read it three times and write it once.
The chunks per row are chosen so that even one row fills the GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024  # elements a loop iteration
TARGET_PROGRAMS = 528  # about four programs per SM of an H100/H200
MAX_SPLITS = 256  # chunks of a row at most: the merge reads them in one fixed-size block


@triton.jit
def _rebase(m):
    """The maximum to subtract: ``m``, or 0 where ``m`` is -inf (every term then is 0, not NaN)."""
    return tl.where(m == float("-inf"), 0.0, m)


# NOTE: the integer arguments that vary with the batch are not specialised on (and the merge block is
# fixed), so each kernel compiles once per dtype: a batch size first seen mid-serving compiles nothing.
@triton.jit(do_not_specialize=["V", "CHUNK", "SPLITS"])
def _greedy_chunk_kernel(logits, stride, part_max, part_sum, part_idx, V, CHUNK, SPLITS, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    start = split * CHUNK
    end = tl.minimum(start + CHUNK, V)
    m = tl.full((), float("-inf"), tl.float32)
    s = tl.zeros((), tl.float32)
    idx = tl.zeros((), tl.int32) + start
    for off in range(start, end, BLOCK):
        cols = off + tl.arange(0, BLOCK)
        x = tl.load(logits + row * stride + cols, mask=cols < end, other=float("-inf")).to(tl.float32)
        block_max = tl.max(x, axis=0)
        block_idx = off + tl.argmax(x, axis=0, tie_break_left=True)
        idx = tl.where(block_max > m, block_idx, idx)  # strictly greater: an earlier block keeps a tie
        new_m = tl.maximum(m, block_max)
        base = _rebase(new_m)
        s = s * tl.exp(m - base) + tl.sum(tl.exp(x - base), axis=0)
        m = new_m
    out = row * SPLITS + split
    tl.store(part_max + out, m)
    tl.store(part_sum + out, s)
    tl.store(part_idx + out, idx)


@triton.jit(do_not_specialize=["SPLITS", "V"])
def _greedy_merge_kernel(part_max, part_sum, part_idx, token_ids, logprobs, SPLITS, V, BLOCK_S: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    o = tl.arange(0, BLOCK_S)
    valid = o < SPLITS
    m = tl.load(part_max + row * SPLITS + o, mask=valid, other=float("-inf"))
    s = tl.load(part_sum + row * SPLITS + o, mask=valid, other=0.0)
    idx = tl.load(part_idx + row * SPLITS + o, mask=valid, other=V)
    best = tl.max(m, axis=0)
    token = tl.min(tl.where(valid & (m == best), idx, V), axis=0)  # the first chunk reaching it
    base = _rebase(best)
    total = tl.sum(s * tl.exp(m - base), axis=0)
    tl.store(token_ids + row, token.to(tl.int64))
    # x[token] - logsumexp(x) = (best - base) - log(total); NaN for a row of -inf only, as log_softmax
    tl.store(logprobs + row, (best - base) - tl.log(total))


def greedy_sample(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """See :func:`deltaserve.ops.sampling.greedy_sample`."""
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    rows, vocab = logits.shape
    token_ids = torch.empty(rows, dtype=torch.int64, device=logits.device)
    logprobs = torch.empty(rows, dtype=torch.float32, device=logits.device)
    if rows == 0:
        return token_ids, logprobs
    splits = max(1, min(triton.cdiv(TARGET_PROGRAMS, rows), triton.cdiv(vocab, BLOCK), MAX_SPLITS))
    chunk = triton.cdiv(triton.cdiv(vocab, splits), BLOCK) * BLOCK
    splits = triton.cdiv(vocab, chunk)
    part_max = torch.empty(rows, splits, dtype=torch.float32, device=logits.device)
    part_sum = torch.empty_like(part_max)
    part_idx = torch.empty(rows, splits, dtype=torch.int32, device=logits.device)
    _greedy_chunk_kernel[(rows, splits)](logits, logits.stride(0), part_max, part_sum, part_idx, vocab, chunk,
                                         splits, BLOCK=BLOCK, num_warps=4)
    _greedy_merge_kernel[(rows,)](part_max, part_sum, part_idx, token_ids, logprobs, splits, vocab,
                                  BLOCK_S=MAX_SPLITS)
    return token_ids, logprobs
