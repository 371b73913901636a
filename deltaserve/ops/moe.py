"""Routed experts of a MoE block: torch reference, dispatched to ``deltaserve/ops/gpu/moe.py`` on CUDA.

Experts are stored stacked: ``w13 [E, 2I, hidden]`` (gate rows first, then up) and
``w2 [E, hidden, I]``; expert ``e`` maps ``x`` to ``w2[e] @ (act(w13[e, :I] @ x) * (w13[e, I:] @ x))``.
"""

from __future__ import annotations

from typing import Callable

import torch

from deltaserve.ops import dispatch


def fused_experts_ref(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    act_fn: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """Torch reference of :func:`fused_experts`: one matmul pair per expert hit (a host sync for the counts)."""
    num_tokens, top_k = topk_ids.shape
    num_experts = w13.shape[0]
    flat_ids = topk_ids.reshape(-1)
    # NOTE: group the T*k (token, expert) pairs by expert, then one matmul per expert hit;
    # accumulation in float32.
    order = torch.argsort(flat_ids, stable=True)
    token_of = order // top_k
    counts = torch.bincount(flat_ids, minlength=num_experts).tolist()
    weights = topk_weights.reshape(-1)[order].unsqueeze(-1)
    out = torch.zeros(num_tokens, x.shape[-1], dtype=torch.float32, device=x.device)
    start = 0
    for expert, count in enumerate(counts):
        if count == 0:
            continue
        rows = token_of[start : start + count]
        gate, up = torch.nn.functional.linear(x[rows], w13[expert]).chunk(2, dim=-1)
        y = torch.nn.functional.linear(act_fn(gate) * up, w2[expert])
        out.index_add_(0, rows, y.float() * weights[start : start + count])
        start += count
    return out.to(x.dtype)


def fused_experts(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    act_fn: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """``sum_j topk_weights[t, j] * expert_{topk_ids[t, j]}(x[t])`` for ``x [T, hidden]``, topk ``[T, k]``
    (weights float32, ids int64); returns ``[T, hidden]`` in ``x.dtype``, summed in float32."""
    return dispatch("moe", "fused_experts", x, fused_experts_ref)(x, w13, w2, topk_weights, topk_ids, act_fn)
