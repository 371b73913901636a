"""The MoE kernels of the GPU path (routing, grouping by expert, the weighted sum) and the routed experts
built on them, against the torch references and a float64 per-token loop."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

from conftest import rel_err  # noqa: E402
from test_ops_moe import naive_experts  # noqa: E402

from deltaserve.ops import gpu_impl  # noqa: E402
from deltaserve.ops.activation import act_and_mul, act_and_mul_ref  # noqa: E402
from deltaserve.ops.gpu.moe import FEW_PAIRS, fused_experts_few, fused_experts_grouped, grouped_mm_supported  # noqa: E402
from deltaserve.ops.gpu.moe_kernels import combine_experts, group_by_expert  # noqa: E402
from deltaserve.ops.moe import (  # noqa: E402
    fused_experts, router_logits, sigmoid_topk, sigmoid_topk_ref, softmax_topk, softmax_topk_ref,
)

SHAPES = [(1, 32, 8), (37, 32, 8), (256, 32, 8), (3, 512, 10), (4096, 512, 10), (300, 64, 4)]


def by_expert(weights: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The chosen experts of each row in ascending order, with their weights (order is not part of the contract)."""
    ids, perm = ids.sort(dim=1)
    return weights.gather(1, perm), ids


def expert_inputs(tokens: int, hidden: int = 256, inter: int = 128, experts: int = 32, top_k: int = 8,
                  dtype: torch.dtype = torch.bfloat16):
    """CUDA ``x [T, hidden]``, ``w13``, ``w2`` (scaled so the outputs stay O(1)) and sigmoid top-k routing."""
    x = torch.randn(tokens, hidden, device="cuda").to(dtype)
    w13 = (torch.randn(experts, 2 * inter, hidden, device="cuda") * hidden**-0.5).to(dtype)
    w2 = (torch.randn(experts, hidden, inter, device="cuda") * inter**-0.5).to(dtype)
    weights, ids = sigmoid_topk(torch.randn(tokens, experts, device="cuda"), None, top_k)
    return x, w13, w2, weights, ids


def test_routing_ops_dispatch_to_the_kernels():
    assert gpu_impl("moe", "sigmoid_topk") is not None
    assert gpu_impl("moe", "softmax_topk") is not None
    assert gpu_impl("moe", "router_logits") is not None


@pytest.mark.parametrize("tokens", [1, 7, 256, 2048])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_router_logits_are_float32_sums_of_exact_products(tokens, dtype):
    # The products of bf16/fp16 values are exact in float32: the logits must agree with a float64
    # recomputation to float32 accumulation error, far below a bf16 rounding of them.
    x = torch.randn(tokens, 2304, device="cuda").to(dtype)
    weight = (torch.randn(256, 2304, device="cuda") * 0.02).to(dtype)
    logits = router_logits(x, weight)
    assert logits.dtype == torch.float32 and logits.shape == (tokens, 256)
    exact = x.double() @ weight.double().T
    assert (logits.double() - exact).abs().max().item() < 1e-4 * exact.abs().max().item()


@pytest.mark.parametrize("tokens, experts, top_k", SHAPES)
def test_sigmoid_routing_chooses_the_reference_experts(tokens, experts, top_k):
    logits = torch.randn(tokens, experts, device="cuda")
    bias = torch.randn(experts, device="cuda") * 0.1
    got = by_expert(*sigmoid_topk(logits, bias, top_k, renormalize=True, scale=2.446))
    expected = by_expert(*sigmoid_topk_ref(logits, bias, top_k, renormalize=True, scale=2.446))
    assert torch.equal(got[1], expected[1])
    assert got[0].dtype == torch.float32 and rel_err(got[0], expected[0]) < 1e-6


@pytest.mark.parametrize("tokens, experts, top_k", SHAPES)
@pytest.mark.parametrize("renormalize", [True, False])
def test_softmax_routing_chooses_the_reference_experts(tokens, experts, top_k, renormalize):
    # NOTE: float32 logits: with bfloat16 ones, equal logits tie and either expert is right.
    logits = torch.randn(tokens, experts, device="cuda")
    got = by_expert(*softmax_topk(logits, top_k, renormalize=renormalize))
    expected = by_expert(*softmax_topk_ref(logits, top_k, renormalize=renormalize))
    assert torch.equal(got[1], expected[1])
    assert rel_err(got[0], expected[0]) < 1e-6


@pytest.mark.parametrize("tokens, experts, top_k", SHAPES)
def test_grouping_by_expert_is_a_stable_sort(tokens, experts, top_k):
    # Experts drawn from the first half only: the other half have empty groups.
    ids = torch.stack([torch.randperm(experts // 2)[:top_k] for _ in range(tokens)]).cuda()
    groups = group_by_expert(ids, experts)
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    assert torch.equal(groups.token_of.long(), order // top_k)
    assert torch.equal(groups.offs, torch.bincount(flat, minlength=experts).cumsum(0).int())
    assert torch.equal(order[groups.row_of.reshape(-1).long()], torch.arange(tokens * top_k, device="cuda"))


def test_combining_sums_each_tokens_rows_in_float32():
    tokens, top_k, hidden = 50, 8, 2304
    y = torch.randn(tokens * top_k, hidden, device="cuda", dtype=torch.bfloat16)
    row_of = torch.randperm(tokens * top_k, device="cuda").int().view(tokens, top_k)
    weights = torch.rand(tokens, top_k, device="cuda")
    got = combine_experts(y, row_of, weights)
    expected = (y.double()[row_of.long()] * weights.double().unsqueeze(-1)).sum(1)
    assert got.dtype == torch.bfloat16 and rel_err(got, expected) < 4e-3


@pytest.mark.parametrize("shape", [(1, 2048), (300, 2048), (5, 3, 96)])
def test_silu_and_mul_matches_reference(shape):
    x = (2 * torch.randn(*shape, device="cuda")).bfloat16()
    got = act_and_mul(x, "silu")
    assert gpu_impl("activation", "act_and_mul") is not None
    assert got.dtype == x.dtype and got.shape == (*shape[:-1], shape[-1] // 2)
    assert rel_err(got, act_and_mul_ref(x.double(), "silu")) < 4e-3


@pytest.mark.skipif(not grouped_mm_supported(0), reason="torch._grouped_mm's bf16 kernel is not available")
@pytest.mark.parametrize("tokens", [1, 7, 256, 2000])
def test_grouped_experts_match_a_float64_loop(tokens):
    x, w13, w2, weights, ids = expert_inputs(tokens)
    got = fused_experts_grouped(x, w13, w2, weights, ids, "silu")
    expected = naive_experts(x.cpu(), w13.cpu(), w2.cpu(), weights.cpu(), ids.cpu())
    assert got.dtype == torch.bfloat16 and not got.isnan().any()
    assert rel_err(got.cpu(), expected) < 1.5e-2


@pytest.mark.parametrize("experts_fn, tokens", [(fused_experts_grouped, 64), (fused_experts_few, 4)])
def test_routing_and_experts_replay_in_a_cuda_graph(experts_fn, tokens):
    if experts_fn is fused_experts_grouped and not grouped_mm_supported(0):
        pytest.skip("torch._grouped_mm's bf16 kernel is not available")
    x, w13, w2, _, _ = expert_inputs(tokens)
    logits = torch.randn(tokens, w13.shape[0], device="cuda")

    def step():
        weights, ids = sigmoid_topk(logits, None, 8)
        return experts_fn(x, w13, w2, weights, ids, "silu")

    step()  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    x.copy_(torch.randn_like(x))
    logits.copy_(torch.randn_like(logits))
    graph.replay()
    assert torch.equal(out, step())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("tokens, activation", [(1, "silu"), (4, "silu"), (16, "silu"), (3, "gelu")])
def test_few_pair_experts_match_a_float64_loop(tokens, activation, dtype):
    # Odd sizes: the last column and reduction blocks are partial. 8 experts, top-4: several tokens per expert.
    x, w13, w2, weights, ids = expert_inputs(tokens, hidden=200, inter=96, experts=8, top_k=4, dtype=dtype)
    got = fused_experts_few(x, w13, w2, weights, ids, activation)
    act = F.silu if activation == "silu" else F.gelu
    expected = naive_experts(x.cpu(), w13.cpu(), w2.cpu(), weights.cpu(), ids.cpu(), act)
    assert got.dtype == dtype and not got.isnan().any()
    assert rel_err(got.cpu(), expected) < (1e-2 if dtype == torch.bfloat16 else 1e-5)


@pytest.mark.parametrize("tokens", [1, FEW_PAIRS // 8, FEW_PAIRS // 8 + 1])
def test_dispatch_on_either_side_of_the_few_pair_bound_matches_a_float64_loop(tokens):
    x, w13, w2, weights, ids = expert_inputs(tokens)
    got = fused_experts(x, w13, w2, weights, ids, "silu")
    expected = naive_experts(x.cpu(), w13.cpu(), w2.cpu(), weights.cpu(), ids.cpu())
    assert rel_err(got.cpu(), expected) < 1.5e-2
