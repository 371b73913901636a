"""Routed experts (``deltaserve.ops.moe.fused_experts``) against a float64 per-token loop."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from conftest import rel_err
from deltaserve.ops.moe import fused_experts


def naive_experts(x, w13, w2, topk_weights, topk_ids, act=F.silu):
    """Per token, per chosen expert, in float64: ``sum_j w_j * down(act(gate(x)) * up(x))``."""
    x, w13, w2, topk_weights = (t.double() for t in (x, w13, w2, topk_weights))
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(topk_ids.shape[1]):
            e = int(topk_ids[t, j])
            gate, up = (w13[e] @ x[t]).chunk(2)
            out[t] += topk_weights[t, j] * (w2[e] @ (act(gate) * up))
    return out


def test_fused_experts_match_a_per_token_loop():
    torch.manual_seed(0)
    tokens, hidden, inter, experts, top_k = 23, 32, 16, 8, 3
    x = torch.randn(tokens, hidden)
    w13 = torch.randn(experts, 2 * inter, hidden) * 0.2
    w2 = torch.randn(experts, hidden, inter) * 0.2
    # Distinct experts per token; experts 5 and 6 chosen by nobody (skipped, not an error).
    topk_ids = torch.stack([torch.tensor([0, 1, 2, 3, 4, 7])[torch.randperm(6)[:top_k]] for _ in range(tokens)])
    topk_weights = torch.rand(tokens, top_k)
    got = fused_experts(x, w13, w2, topk_weights, topk_ids, "silu")
    assert got.dtype == x.dtype
    assert rel_err(got.double(), naive_experts(x, w13, w2, topk_weights, topk_ids)) < 1e-5


def test_fused_experts_of_no_tokens_is_empty():
    x = torch.zeros(0, 8)
    ids = torch.zeros(0, 2, dtype=torch.long)
    out = fused_experts(x, torch.zeros(4, 6, 8), torch.zeros(4, 8, 3), torch.zeros(0, 2), ids, "silu")
    assert out.shape == (0, 8)
