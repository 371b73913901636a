"""KDA on the GPU (fla-core's gate and chunked prefill, the Triton decode kernel) vs the torch reference."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("triton")
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)
pytest.importorskip("fla")

from conftest import rel_err  # noqa: E402

from deltaserve.ops import gpu_impl  # noqa: E402
from deltaserve.ops.delta_rule import (  # noqa: E402
    chunk_delta_rule_ref as chunk_kda_ref,
    fused_recurrent_delta_rule_ref as fused_recurrent_kda_ref,
)
from deltaserve.ops.gpu import delta_rule as gpu_delta_rule  # noqa: E402
from deltaserve.ops.kda import chunk_kda, fused_recurrent_kda, kda_gate, kda_gate_ref, kda_gates, kda_gates_ref  # noqa: E402

H, D, NUM_SLOTS = 4, 128, 8
# fla's chunk kernels multiply bf16 tiles (tf32 for fp32 inputs) with fp32 accumulation
CHUNK_BOUND = {torch.bfloat16: 2e-2, torch.float32: 5e-3}


def gate_params() -> tuple[torch.Tensor, torch.Tensor]:
    """Checkpoint-like gate parameters (transformers' init): A in [1, 16], dt in [1e-3, 1e-1]."""
    A_log = torch.empty(1, 1, H, 1).uniform_(1, 16).log()
    dt = torch.empty(H * D).uniform_(math.log(1e-3), math.log(1e-1)).exp()
    return A_log, dt + torch.log(-torch.expm1(-dt))


def make_inputs(num_tokens: int, dtype: torch.dtype):
    """q, k, v as column slices of one fused projection (strided views), g float32, beta in (0, 1)."""
    proj = torch.randn(num_tokens, 3 * H * D).to(dtype)
    q, k, v = (proj[:, i * H * D : (i + 1) * H * D].view(num_tokens, H, D) for i in range(3))
    A_log, dt_bias = gate_params()
    g = kda_gate_ref(torch.randn(num_tokens, H * D), A_log, dt_bias)
    beta = torch.rand(num_tokens, H).sigmoid().to(dtype)
    return q, k, v, g, beta


def nan_pool(used: dict[int, bool]) -> torch.Tensor:
    """``[NUM_SLOTS+1, H, V, K]`` float32 of NaN; used slots get a random state (True) or stay NaN (False)."""
    pool = torch.full((NUM_SLOTS + 1, H, D, D), float("nan"))
    for slot, has_state in used.items():
        if has_state:
            pool[slot] = 0.05 * torch.randn(H, D, D)
    return pool


def cuda(*tensors):
    return [t.cuda() for t in tensors]


def test_gpu_dispatch_is_used():
    assert gpu_impl("kda", "kda_gate") is not None
    assert gpu_impl("kda", "kda_gates") is not None
    for name in ("chunk_delta_rule", "fused_recurrent_delta_rule"):
        assert gpu_impl("delta_rule", name) is not None, name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kda_gate_matches_reference(dtype):
    f = (2 * torch.randn(33, H * D)).to(dtype)
    A_log, dt_bias = gate_params()
    out = kda_gate(*cuda(f, A_log, dt_bias))
    assert out.dtype == torch.float32 and out.shape == (33, H, D)
    assert rel_err(out.cpu(), kda_gate_ref(f, A_log, dt_bias)) < 1e-5


@pytest.mark.parametrize("num_tokens", [1, 17, 256])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kda_gates_read_column_views_of_one_projection(num_tokens, dtype):
    # f and b as the layer passes them: column slices of one wider GEMM output (row stride > width).
    proj = (4 * torch.randn(num_tokens, H * D + H + 40)).to(dtype)
    f, b = proj[:, : H * D], proj[:, H * D : H * D + H]
    A_log, dt_bias = gate_params()
    g, beta = kda_gates(*cuda(f, b, A_log, dt_bias))
    g_ref, beta_ref = kda_gates_ref(f, b, A_log, dt_bias)
    assert g.dtype == beta.dtype == torch.float32 and g.shape == (num_tokens, H, D) and beta.shape == (num_tokens, H)
    assert rel_err(g.cpu(), g_ref) < 1e-5 and (beta.cpu() - beta_ref).abs().max().item() < 1e-6


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_chunk_kda_varlen_matches_reference(dtype):
    lengths = [1, 70, 130, 5, 64]
    slots = [3, 1, 6, 2, 8]
    has_init = [True, False, True, False, True]
    pool = nan_pool(dict(zip(slots, has_init)))
    inputs = make_inputs(sum(lengths), dtype)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    index, init = torch.tensor(slots, dtype=torch.int32), torch.tensor(has_init)
    gpu_pool = pool.cuda()
    out = chunk_kda(*cuda(*inputs), gpu_pool, *cuda(cu, index, init))
    expected = chunk_kda_ref(*inputs, pool, cu, index, init)
    assert out.dtype == dtype and not out.isnan().any()
    err = rel_err(out.cpu(), expected)
    print(f"chunk_kda {dtype}: output rel err {err:.2e}")
    assert err < CHUNK_BOUND[dtype]
    for slot in slots:
        state_err = rel_err(gpu_pool[slot].cpu(), pool[slot])
        print(f"chunk_kda {dtype}: slot {slot} state rel err {state_err:.2e}")
        assert state_err < CHUNK_BOUND[dtype]
    untouched = [s for s in range(NUM_SLOTS + 1) if s not in slots]
    assert gpu_pool[untouched].isnan().all()


@pytest.mark.parametrize("impl", ["triton", "fla"])
@pytest.mark.parametrize("dtype, bound", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_fused_recurrent_kda_matches_reference(impl, dtype, bound):
    slots = [5, 2, 7, 1, 3]
    pool = nan_pool({s: True for s in slots})
    q, k, v, g, beta = make_inputs(len(slots), dtype)
    index = torch.tensor(slots, dtype=torch.int32)
    gpu_pool = pool.cuda()
    fn = fused_recurrent_kda if impl == "triton" else gpu_delta_rule.fused_recurrent_kda_fla
    out = fn(*cuda(q, k, v, g, beta), gpu_pool, index.cuda())
    expected = fused_recurrent_kda_ref(q, k, v, g, beta, pool, index)
    assert out.dtype == dtype
    assert rel_err(out.cpu(), expected) < bound
    assert rel_err(gpu_pool[slots].cpu(), pool[slots]) < 1e-5
    untouched = [s for s in range(NUM_SLOTS + 1) if s not in slots]
    assert gpu_pool[untouched].isnan().all()


def test_prefill_then_decode_equals_one_prefill():
    dtype = torch.bfloat16
    q, k, v, g, beta = cuda(*make_inputs(100, dtype))
    slot = torch.tensor([4], dtype=torch.int32).cuda()
    no_init = torch.tensor([False]).cuda()
    one = nan_pool({}).cuda()
    full = chunk_kda(q, k, v, g, beta, one, torch.tensor([0, 100], dtype=torch.int32).cuda(), slot, no_init)
    split = nan_pool({}).cuda()
    head = chunk_kda(q[:96], k[:96], v[:96], g[:96], beta[:96], split,
                     torch.tensor([0, 96], dtype=torch.int32).cuda(), slot, no_init)
    tail = [fused_recurrent_kda(q[t : t + 1], k[t : t + 1], v[t : t + 1], g[t : t + 1], beta[t : t + 1], split, slot)
            for t in range(96, 100)]
    assert rel_err(torch.cat([head, *tail]).float(), full.float()) < 2e-2
    assert rel_err(split[4], one[4]) < 2e-2



def test_fused_recurrent_kda_small_heads_match_reference():
    # tiny test models (head_dim 16) take the same kernel with fewer rows per program
    batch, heads, dim = 3, 2, 16
    q, k, v = (torch.randn(batch, heads, dim) for _ in range(3))
    g = -torch.rand(batch, heads, dim)
    beta = torch.rand(batch, heads)
    pool = torch.full((5, heads, dim, dim), float("nan"))
    index = torch.tensor([3, 1, 4], dtype=torch.int32)
    pool[index.long()] = 0.1 * torch.randn(batch, heads, dim, dim)
    gpu_pool = pool.cuda()
    out = fused_recurrent_kda(*cuda(q, k, v, g, beta), gpu_pool, index.cuda())
    expected = fused_recurrent_kda_ref(q, k, v, g, beta, pool, index)
    assert rel_err(out.cpu(), expected) < 1e-5
    assert rel_err(gpu_pool[index.long()].cpu(), pool[index.long()]) < 1e-5
    assert gpu_pool[[0, 2]].isnan().all()
