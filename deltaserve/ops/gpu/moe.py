"""Routed experts on the GPU with static shapes and no host sync (CUDA-graph safe).

Same contracts as :mod:`deltaserve.ops.moe`: the router logits (one tensor-core GEMM with float32
output), the routers' top-k (one Triton kernel a batch) and the routed experts, three paths:

- at most ``FEW_PAIRS`` (token, expert) pairs (decode up to batch 256, speculative verify): the pairs
  grouped by expert and two Triton GEMMs that stream each expert's weights once per block of its
  rows, the activation fused into the first (``moe_gemm``).
- bfloat16 with ``torch._grouped_mm`` (Hopper/Ampere, torch >= 2.9): the ``T*k`` (token, expert)
  pairs are grouped by expert, gathered, and run through two grouped GEMMs whose group boundaries
  (``offs``) stay on the device; each expert's weights are read once per step. Grouping and the
  weighted sum are one Triton kernel each (``moe_kernels``).
- otherwise (float32, older GPUs): every expert on every token as two batched matmuls, the
  unchosen ones weighted by zero. ``E/k`` times the arithmetic, fine for small models and tests.
"""

from __future__ import annotations

import functools

import torch

from deltaserve.ops.activation import ACTIVATIONS
from deltaserve.ops.gpu.activation import act_and_mul

from deltaserve.ops.gpu.moe_gemm import KERNEL_ACTIVATIONS, expert_down, expert_gate_up
from deltaserve.ops.gpu.moe_kernels import SIGMOID, SOFTMAX, combine_experts, group_by_expert, topk_route
from deltaserve.ops.moe import router_logits_ref, sigmoid_topk_ref


# Pair counts (tokens * top_k) up to which the Triton expert GEMMs run: they beat torch._grouped_mm
# by 1.2-1.6x at every count measured up to here (benchmarks/bench_moe.py on an H200: 1 to 256 tokens,
# top-8, 32 and 256 experts); larger steps (prefill) are compute-bound, where cutlass's grouped GEMM
# is the tuned one.
FEW_PAIRS = 2048


def router_logits(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """bf16 or fp16 operands of one dtype: a single GEMM accumulating and writing float32 (``torch.mm``'s
    ``out_dtype``), the same sums as widening both first, since the product of two bf16 (or fp16) values
    is exact in float32, without the float32 copy of ``x`` and the SIMT float32 GEMM over a weight read
    at twice its size; other dtypes through the reference."""
    if x.dim() == 2 and x.dtype == weight.dtype and x.dtype in (torch.bfloat16, torch.float16):
        return torch.mm(x, weight.t(), out_dtype=torch.float32)
    return router_logits_ref(x, weight)


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
    activation: str = "silu",
) -> torch.Tensor:
    """Pairs grouped by expert (one counting-sort kernel), gathered, two ``torch._grouped_mm`` calls,
    then one kernel for the weighted sum in float32."""
    groups = group_by_expert(topk_ids, w13.shape[0])
    xs = x.index_select(0, groups.token_of)  # [T*k, hidden], grouped by expert
    gate_up = torch._grouped_mm(xs, w13.transpose(-2, -1), offs=groups.offs)  # [T*k, 2I]
    y = torch._grouped_mm(act_and_mul(gate_up, activation), w2.transpose(-2, -1), offs=groups.offs)  # [T*k, hidden]
    return combine_experts(y, groups.row_of, topk_weights)


def fused_experts_few(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    activation: str = "silu",
) -> torch.Tensor:
    """Pairs grouped by expert, the gate/up GEMM with its activation, the down GEMM, the weighted sum:
    four launches, each expert's weights read once per block of 16 to 64 of its rows."""
    groups = group_by_expert(topk_ids, w13.shape[0])
    h = expert_gate_up(x, w13, groups.token_of, groups.offs, activation)  # [T*k, I], grouped by expert
    return combine_experts(expert_down(h, w2, groups.offs), groups.row_of, topk_weights)


def fused_experts_dense(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    activation: str = "silu",
) -> torch.Tensor:
    """Every expert on every token (two bmm), combined with a ``[T, E]`` weight matrix that is zero off the top-k."""
    num_tokens = x.shape[0]
    num_experts = w13.shape[0]
    gate, up = torch.matmul(x.unsqueeze(0), w13.transpose(1, 2)).chunk(2, dim=-1)  # [E, T, I] each
    y = torch.bmm(ACTIVATIONS[activation](gate) * up, w2.transpose(1, 2))  # [E, T, hidden]
    dense = torch.zeros(num_tokens, num_experts, dtype=torch.float32, device=x.device)
    dense.scatter_(1, topk_ids, topk_weights.float())
    return torch.einsum("te,eth->th", dense, y.float()).to(x.dtype)


def fused_experts(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    activation: str = "silu",
) -> torch.Tensor:
    """See :func:`deltaserve.ops.moe.fused_experts`: the Triton expert GEMMs for few pairs, grouped GEMMs
    for bf16 where supported, else dense."""
    if x.shape[0] == 0:
        return torch.zeros_like(x)
    if topk_ids.numel() <= FEW_PAIRS and activation in KERNEL_ACTIVATIONS and x.dtype == w13.dtype == w2.dtype:
        return fused_experts_few(x, w13, w2, topk_weights, topk_ids, activation)
    if x.dtype == torch.bfloat16 and w13.dtype == torch.bfloat16 and grouped_mm_supported(x.device.index or 0):
        return fused_experts_grouped(x, w13, w2, topk_weights, topk_ids, activation)
    return fused_experts_dense(x, w13, w2, topk_weights, topk_ids, activation)


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
    """See :func:`deltaserve.ops.moe.sigmoid_topk`; one kernel unless the experts are grouped."""
    if num_expert_group > 1:
        return sigmoid_topk_ref(
            logits, bias, top_k, num_expert_group=num_expert_group, topk_group=topk_group,
            renormalize=renormalize, scale=scale,
        )  # fmt: skip
    return topk_route(logits, top_k, score=SIGMOID, bias=bias, renormalize=renormalize, scale=scale, eps=1e-20)


def softmax_topk(logits: torch.Tensor, top_k: int, *, renormalize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """See :func:`deltaserve.ops.moe.softmax_topk`; one kernel."""
    return topk_route(logits, top_k, score=SOFTMAX, renormalize=renormalize)
