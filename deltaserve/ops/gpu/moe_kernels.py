"""Triton kernels around the routed experts' grouped GEMMs: one launch each for routing, grouping
and combining, where the torch composition took about twenty small kernels per MoE layer.

- :func:`topk_route`: a row of router logits -> sigmoid (plus the choice-only bias) or softmax
  scores in float32, the ``top_k`` best (iterated arg-max: ties go to the lower expert index),
  renormalised and scaled.
- :func:`group_by_expert`: a counting sort of the ``T*k`` (token, expert) pairs, stable within each
  expert (the order of a stable ``argsort``): for each sorted row its token, for each pair its row,
  and the groups' ends ``offs`` for ``torch._grouped_mm``.
- :func:`combine_experts`: each token's ``k`` expert rows, weighted and summed in float32.

All shapes are static and nothing reads back to the host, so the kernels are CUDA-graph safe.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

SIGMOID, SOFTMAX = 0, 1


@triton.jit(do_not_specialize=["T"])
def _topk_route_kernel(
    logits, stride_t, bias, weights, ids, T, E, scale, eps,
    TOP_K: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
    SCORE: tl.constexpr, HAS_BIAS: tl.constexpr, RENORMALIZE: tl.constexpr,
):
    t = tl.program_id(0)
    cols = tl.arange(0, BLOCK_E)
    m = cols < E
    logit = tl.load(logits + t.to(tl.int64) * stride_t + cols, mask=m, other=float("-inf")).to(tl.float32)
    if SCORE == 0:
        scores = tl.sigmoid(logit)
        choice = scores
        if HAS_BIAS:
            choice = scores + tl.load(bias + cols, mask=m, other=0.0).to(tl.float32)
    else:
        p = tl.exp(logit - tl.max(logit, axis=0))
        scores = p / tl.sum(p, axis=0)
        choice = scores
    choice = tl.where(m, choice, float("-inf"))
    slots = tl.arange(0, BLOCK_K)
    chosen_w = tl.zeros([BLOCK_K], dtype=tl.float32)
    chosen_i = tl.zeros([BLOCK_K], dtype=tl.int64)
    for j in tl.static_range(TOP_K):
        best = tl.argmax(choice, axis=0)
        w = tl.sum(tl.where(cols == best, scores, 0.0), axis=0)
        chosen_w = tl.where(slots == j, w, chosen_w)
        chosen_i = tl.where(slots == j, best.to(tl.int64), chosen_i)
        choice = tl.where(cols == best, float("-inf"), choice)
    if RENORMALIZE:
        chosen_w = chosen_w / (tl.sum(chosen_w, axis=0) + eps)
    out = t.to(tl.int64) * TOP_K + slots
    tl.store(weights + out, chosen_w * scale, mask=slots < TOP_K)
    tl.store(ids + out, chosen_i, mask=slots < TOP_K)


def topk_route(
    logits: torch.Tensor,
    top_k: int,
    *,
    score: int,
    bias: torch.Tensor | None = None,
    renormalize: bool = True,
    scale: float = 1.0,
    eps: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits ``[T, E]`` (any float dtype, unit stride over E) -> (weights float32 ``[T, k]``, ids int64 ``[T, k]``).

    ``score``: ``SIGMOID`` (``bias`` added for the choice only) or ``SOFTMAX``; renormalised weights
    are ``w / (sum(w) + eps)``, then times ``scale``.
    """
    num_tokens, num_experts = logits.shape
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    weights = torch.empty(num_tokens, top_k, dtype=torch.float32, device=logits.device)
    ids = torch.empty(num_tokens, top_k, dtype=torch.int64, device=logits.device)
    if num_tokens == 0:
        return weights, ids
    has_bias = bias is not None
    _topk_route_kernel[(num_tokens,)](
        logits, logits.stride(0), bias if has_bias else logits, weights, ids, num_tokens, num_experts,
        float(scale), float(eps),
        TOP_K=top_k, BLOCK_E=triton.next_power_of_2(num_experts), BLOCK_K=triton.next_power_of_2(top_k),
        SCORE=score, HAS_BIAS=has_bias, RENORMALIZE=renormalize,
    )  # fmt: skip
    return weights, ids


@triton.jit(do_not_specialize=["N"])
def _group_by_expert_kernel(ids, token_of, row_of, offs, N, TOP_K: tl.constexpr, BLOCK: tl.constexpr):
    # One program per expert: it counts the pairs of lower experts (where its group starts) and its
    # own, then walks the pairs again and gives each of its own the next row of the group.
    e = tl.program_id(0)
    lower = tl.zeros([BLOCK], dtype=tl.int32)
    mine = tl.zeros([BLOCK], dtype=tl.int32)
    for start in range(0, N, BLOCK):
        idx = start + tl.arange(0, BLOCK)
        expert = tl.load(ids + idx, mask=idx < N, other=2**30)
        lower += (expert < e).to(tl.int32)
        mine += (expert == e).to(tl.int32)
    begin = tl.sum(lower, axis=0)
    tl.store(offs + e, begin + tl.sum(mine, axis=0))
    next_row = begin
    for start in range(0, N, BLOCK):
        idx = start + tl.arange(0, BLOCK)
        hit = (tl.load(ids + idx, mask=idx < N, other=2**30) == e).to(tl.int32)
        row = next_row + tl.cumsum(hit, axis=0) - 1
        tl.store(row_of + idx, row, mask=hit != 0)
        tl.store(token_of + row, idx // TOP_K, mask=hit != 0)
        next_row += tl.sum(hit, axis=0)


class ExpertGroups(NamedTuple):
    """The ``T*k`` pairs grouped by expert: sorted row -> token, pair -> sorted row, group ends."""

    token_of: torch.Tensor  # [T*k] int32
    row_of: torch.Tensor  # [T, k] int32
    offs: torch.Tensor  # [E] int32, inclusive ends (torch._grouped_mm's offs)


def group_by_expert(topk_ids: torch.Tensor, num_experts: int) -> ExpertGroups:
    """Counting sort of ``topk_ids [T, k]`` by expert, stable within each expert."""
    num_tokens, top_k = topk_ids.shape
    n = num_tokens * top_k
    device = topk_ids.device
    token_of = torch.empty(n, dtype=torch.int32, device=device)
    row_of = torch.empty(num_tokens, top_k, dtype=torch.int32, device=device)
    offs = torch.empty(num_experts, dtype=torch.int32, device=device)
    block = min(4096, max(128, triton.next_power_of_2(n)))
    _group_by_expert_kernel[(num_experts,)](topk_ids.contiguous(), token_of, row_of, offs, n, TOP_K=top_k, BLOCK=block)
    return ExpertGroups(token_of, row_of, offs)


@triton.jit
def _combine_kernel(y, stride_y, row_of, weights, out, stride_o, H, TOP_K: tl.constexpr, BLOCK_H: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    m = cols < H
    acc = tl.zeros([BLOCK_H], dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        row = tl.load(row_of + t * TOP_K + j).to(tl.int64)
        w = tl.load(weights + t * TOP_K + j).to(tl.float32)
        acc += w * tl.load(y + row * stride_y + cols, mask=m, other=0.0).to(tl.float32)
    tl.store(out + t * stride_o + cols, acc.to(out.dtype.element_ty), mask=m)


def combine_experts(y: torch.Tensor, row_of: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
    """``out[t] = sum_j topk_weights[t, j] * y[row_of[t, j]]`` in float32, returned in ``y.dtype`` ``[T, H]``."""
    num_tokens, top_k = row_of.shape
    hidden = y.shape[1]
    out = torch.empty(num_tokens, hidden, dtype=y.dtype, device=y.device)
    if num_tokens == 0:
        return out
    block_h = min(1024, triton.next_power_of_2(hidden))
    grid = (num_tokens, triton.cdiv(hidden, block_h))
    _combine_kernel[grid](
        y, y.stride(0), row_of, topk_weights.contiguous(), out, out.stride(0), hidden, TOP_K=top_k, BLOCK_H=block_h
    )
    return out
