"""A MoE block's routing and routed experts: torch references, dispatched to ``deltaserve/ops/gpu/moe.py`` on CUDA.

Routing: router logits ``[T, E]`` in float32 (:func:`router_logits`) -> (weights float32 ``[T, k]``, ids int64 ``[T, k]``), by sigmoid
scores with a choice-only bias (:func:`sigmoid_topk`, DeepSeek-V3 / Kimi) or a softmax
(:func:`softmax_topk`, Qwen). The order of the ``k`` chosen experts is not part of the contract.

Experts are stored stacked: ``w13 [E, 2I, hidden]`` (gate rows first, then up) and
``w2 [E, hidden, I]``; expert ``e`` maps ``x`` to ``w2[e] @ (act(w13[e, :I] @ x) * (w13[e, I:] @ x))`` (``act`` named by ``activation``).
"""

from __future__ import annotations

import torch

from deltaserve.ops import dispatch
from deltaserve.ops.activation import ACTIVATIONS, check_activation


def fused_experts_ref(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    activation: str = "silu",
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
        y = torch.nn.functional.linear(ACTIVATIONS[activation](gate) * up, w2[expert])
        out.index_add_(0, rows, y.float() * weights[start : start + count])
        start += count
    return out.to(x.dtype)


def fused_experts(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    activation: str = "silu",
) -> torch.Tensor:
    """``sum_j topk_weights[t, j] * expert_{topk_ids[t, j]}(x[t])`` for ``x [T, hidden]``, topk ``[T, k]``
    (weights float32, ids int64); returns ``[T, hidden]`` in ``x.dtype``, summed in float32."""
    check_activation(activation)
    return dispatch("moe", "fused_experts", x, fused_experts_ref)(x, w13, w2, topk_weights, topk_ids, activation)


def router_logits_ref(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Torch reference of :func:`router_logits`: both operands widened to float32, then one GEMM."""
    return torch.nn.functional.linear(x.float(), weight.float())


def router_logits(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Float32 router logits ``x @ weight.T`` for ``x [T, hidden]``, ``weight [E, hidden]``: every product
    and every sum in float32, whatever the inputs' dtype (the routing decides by small differences)."""
    return dispatch("moe", "router_logits", x, router_logits_ref)(x, weight)


def sigmoid_topk_ref(
    logits: torch.Tensor,
    bias: torch.Tensor | None,
    top_k: int,
    *,
    num_expert_group: int = 1,
    topk_group: int = 1,
    renormalize: bool = True,
    scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch reference of :func:`sigmoid_topk`."""
    scores = logits.float().sigmoid()
    scores_for_choice = scores if bias is None else scores + bias
    if num_expert_group > 1:
        num_tokens = logits.shape[0]
        grouped = scores_for_choice.view(num_tokens, num_expert_group, -1)
        group_scores = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(dim=-1)
        group_idx = group_scores.topk(topk_group, dim=-1, sorted=False).indices
        group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, group_idx, True)
        expert_mask = group_mask.unsqueeze(-1).expand_as(grouped).reshape(num_tokens, -1)
        scores_for_choice = scores_for_choice.masked_fill(~expert_mask, float("-inf"))
    topk_ids = scores_for_choice.topk(top_k, dim=-1, sorted=False).indices
    topk_weights = scores.gather(1, topk_ids)
    if renormalize:
        topk_weights = topk_weights / (topk_weights.sum(dim=-1, keepdim=True) + 1e-20)
    return topk_weights * scale, topk_ids


def sigmoid_topk(
    logits: torch.Tensor,
    bias: torch.Tensor | None,
    top_k: int,
    *,
    num_expert_group: int = 1,
    topk_group: int = 1,
    renormalize: bool = True,
    scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sigmoid scores in float32; ``bias`` (float32 ``[E]``) only chooses the experts.

    Grouped top-k: the experts are split into ``num_expert_group`` groups, each group is scored by
    the sum of its two best biased scores, the best ``topk_group`` groups are kept, and the
    ``top_k`` best biased scores among their experts are chosen. The weights are the raw scores of
    the chosen experts, renormalised to sum 1 (``renormalize``), times ``scale``.
    """
    impl = dispatch("moe", "sigmoid_topk", logits, sigmoid_topk_ref)
    return impl(
        logits, bias, top_k, num_expert_group=num_expert_group, topk_group=topk_group,
        renormalize=renormalize, scale=scale,
    )  # fmt: skip


def softmax_topk_ref(logits: torch.Tensor, top_k: int, *, renormalize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch reference of :func:`softmax_topk`."""
    probs = torch.softmax(logits.float(), dim=-1)
    topk_weights, topk_ids = probs.topk(top_k, dim=-1)
    if renormalize:
        topk_weights = topk_weights / topk_weights.sum(dim=-1, keepdim=True)
    return topk_weights, topk_ids


def softmax_topk(logits: torch.Tensor, top_k: int, *, renormalize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over the experts in float32, the ``top_k`` best, renormalised to sum 1 when ``renormalize``."""
    return dispatch("moe", "softmax_topk", logits, softmax_topk_ref)(logits, top_k, renormalize=renormalize)
