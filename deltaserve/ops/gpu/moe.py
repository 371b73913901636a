"""Routed experts on the GPU with static shapes and no host sync (CUDA-graph safe).

Same contract as :func:`deltaserve.ops.moe.fused_experts_ref`. Two paths:

- bfloat16 with ``torch._grouped_mm`` (Hopper/Ampere, torch >= 2.9): the ``T*k`` (token, expert)
  pairs are sorted by expert, gathered, and run through two grouped GEMMs whose group boundaries
  (``offs``) stay on the device; each expert's weights are read once per step.
- otherwise (float32, older GPUs): every expert on every token as two batched matmuls, the
  unchosen ones weighted by zero. ``E/k`` times the arithmetic, fine for small models and tests.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch


@functools.lru_cache(maxsize=None)
def grouped_mm_supported(device_index: int) -> bool:
    """``torch._grouped_mm`` exists and runs its bf16 kernel on this device (compute capability >= 8.0)."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    return torch.cuda.get_device_capability(device_index) >= (8, 0)


def fused_experts_grouped(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    act_fn: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """Sort (token, expert) pairs by expert, two ``torch._grouped_mm`` calls, weighted sum in float32."""
    num_tokens, top_k = topk_ids.shape
    num_experts = w13.shape[0]
    flat_ids = topk_ids.reshape(-1)
    _, order = torch.sort(flat_ids)
    token_of = order // top_k
    # NOTE: counts by scatter_add, not bincount (which syncs to size its output).
    counts = torch.zeros(num_experts, dtype=torch.int32, device=x.device)
    counts.scatter_add_(0, flat_ids, torch.ones_like(flat_ids, dtype=torch.int32))
    offs = counts.cumsum(0, dtype=torch.int32)
    xs = x.index_select(0, token_of)  # [S, hidden], grouped by expert
    gate, up = torch._grouped_mm(xs, w13.transpose(-2, -1), offs=offs).chunk(2, dim=-1)  # [S, I] each
    y = torch._grouped_mm(act_fn(gate) * up, w2.transpose(-2, -1), offs=offs)  # [S, hidden]
    y = y.float() * topk_weights.reshape(-1).float().index_select(0, order).unsqueeze(-1)
    # Back to (token, k) order; each row is written once, so the sum below is deterministic.
    unsorted = torch.empty_like(y).index_copy_(0, order, y)
    return unsorted.view(num_tokens, top_k, -1).sum(dim=1).to(x.dtype)


def fused_experts_dense(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    act_fn: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """Every expert on every token (two bmm), combined with a ``[T, E]`` weight matrix that is zero off the top-k."""
    num_tokens = x.shape[0]
    num_experts = w13.shape[0]
    gate, up = torch.matmul(x.unsqueeze(0), w13.transpose(1, 2)).chunk(2, dim=-1)  # [E, T, I] each
    y = torch.bmm(act_fn(gate) * up, w2.transpose(1, 2))  # [E, T, hidden]
    dense = torch.zeros(num_tokens, num_experts, dtype=torch.float32, device=x.device)
    dense.scatter_(1, topk_ids, topk_weights.float())
    return torch.einsum("te,eth->th", dense, y.float()).to(x.dtype)


def fused_experts(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    act_fn: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """See :func:`deltaserve.ops.moe.fused_experts`; grouped GEMMs for bf16 where supported, else dense."""
    if x.shape[0] == 0:
        return torch.zeros_like(x)
    if x.dtype == torch.bfloat16 and w13.dtype == torch.bfloat16 and grouped_mm_supported(x.device.index or 0):
        return fused_experts_grouped(x, w13, w2, topk_weights, topk_ids, act_fn)
    return fused_experts_dense(x, w13, w2, topk_weights, topk_ids, act_fn)
