"""GDN on the GPU (fla's chunk_gated_delta_rule prefill, the Triton decode kernel with a per-head gate and GVA,
the gate kernel) vs the torch references; the GatedDeltaNet layer on CUDA vs the same layer on the CPU."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)
pytest.importorskip("fla")

from conftest import rel_err  # noqa: E402
from helpers_layer import nan_pool as nan_state_pool, run_layer  # noqa: E402

from deltaserve.layers.gdn import GatedDeltaNet  # noqa: E402
from deltaserve.ops import gpu_impl  # noqa: E402
from deltaserve.ops.delta_rule import (  # noqa: E402
    chunk_delta_rule,
    chunk_delta_rule_ref,
    fused_recurrent_delta_rule,
    fused_recurrent_delta_rule_ref,
    gdn_gate,
    gdn_gate_ref,
)
from deltaserve.ops.gpu import delta_rule as gpu_delta_rule  # noqa: E402
from deltaserve.state.layout import gdn_layout  # noqa: E402

HK, HV, D, NUM_SLOTS = 2, 4, 128, 8
CHUNK_BOUND = {torch.bfloat16: 2e-2, torch.float32: 5e-3}


def make_inputs(num_tokens: int, dtype: torch.dtype, num_k_heads: int = HK, num_v_heads: int = HV, dim: int = D):
    """q, k, v as column slices of one fused projection (strided views), g, beta float32 from the gate."""
    width = (2 * num_k_heads + num_v_heads) * dim
    proj = torch.randn(num_tokens, width).to(dtype)
    q, k, v = proj.split([num_k_heads * dim, num_k_heads * dim, num_v_heads * dim], dim=-1)
    q, k = q.view(num_tokens, num_k_heads, dim), k.view(num_tokens, num_k_heads, dim)
    v = v.view(num_tokens, num_v_heads, dim)
    A_log = torch.empty(num_v_heads).uniform_(0.01, 16).log()
    g, beta = gdn_gate_ref(torch.randn(num_tokens, num_v_heads), torch.randn(num_tokens, num_v_heads), A_log,
                           torch.ones(num_v_heads))  # fmt: skip
    return q, k, v, g, beta


def nan_pool(used: dict[int, bool], heads: int = HV, dim: int = D, dtype=torch.float32) -> torch.Tensor:
    pool = torch.full((NUM_SLOTS + 1, heads, dim, dim), float("nan"), dtype=dtype)
    for slot, has_state in used.items():
        if has_state:
            pool[slot] = 0.05 * torch.randn(heads, dim, dim)
    return pool


def cuda(*tensors):
    return [t.cuda() for t in tensors]


def untouched(pool: torch.Tensor, slots) -> bool:
    return bool(pool[[s for s in range(NUM_SLOTS + 1) if s not in slots]].isnan().all())


def test_gpu_dispatch_is_used():
    for name in ("chunk_delta_rule", "fused_recurrent_delta_rule", "gdn_gate"):
        assert gpu_impl("delta_rule", name) is not None, name


def test_gdn_gate_matches_reference():
    ba = torch.randn(37, 2 * HV).bfloat16()
    b, a = ba[:, :HV], ba[:, HV:]  # row-strided views, as the layer passes them
    A_log, dt_bias = torch.empty(HV).uniform_(0.01, 16).log(), torch.randn(HV)
    g, beta = gdn_gate(*cuda(a, b, A_log, dt_bias))
    g_ref, beta_ref = gdn_gate_ref(a, b, A_log, dt_bias)
    assert g.dtype == beta.dtype == torch.float32
    assert rel_err(g.cpu(), g_ref) < 1e-5 and rel_err(beta.cpu(), beta_ref) < 1e-5


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_chunk_gdn_varlen_gva_matches_reference(dtype, state_dtype):
    lengths, slots, has_init = [1, 70, 130, 5, 64], [3, 1, 6, 2, 8], [True, False, True, False, True]
    pool = nan_pool(dict(zip(slots, has_init)), dtype=state_dtype)
    inputs = make_inputs(sum(lengths), dtype)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    index, init = torch.tensor(slots, dtype=torch.int32), torch.tensor(has_init)
    gpu_pool = pool.cuda()
    out = chunk_delta_rule(*cuda(*inputs), gpu_pool, *cuda(cu, index, init))
    expected = chunk_delta_rule_ref(*inputs, pool, cu, index, init)
    bound = max(CHUNK_BOUND[dtype], 2e-2 if state_dtype == torch.bfloat16 else 0)
    assert out.dtype == dtype and not out.isnan().any()
    err = rel_err(out.cpu(), expected)
    print(f"chunk gdn {dtype} state {state_dtype}: output rel err {err:.2e}")
    assert err < bound
    for slot in slots:
        assert rel_err(gpu_pool[slot].cpu().float(), pool[slot].float()) < bound, f"slot {slot}"
    assert untouched(gpu_pool, slots)


@pytest.mark.parametrize("block_v, num_warps", [(None, None), (4, 1), (8, 2), (16, 4), (32, 8)])
@pytest.mark.parametrize("heads", [(HK, HV), (HV, HV)])
def test_fused_recurrent_gdn_matches_reference(heads, block_v, num_warps):
    slots = [5, 2, 7, 1, 3]
    pool = nan_pool({s: True for s in slots})
    q, k, v, g, beta = make_inputs(len(slots), torch.float32, *heads)
    index = torch.tensor(slots, dtype=torch.int32)
    gpu_pool = pool.cuda()
    out = gpu_delta_rule.fused_recurrent_delta_rule(*cuda(q, k, v, g, beta), gpu_pool, index.cuda(),
                                                    block_v=block_v, num_warps=num_warps)  # fmt: skip
    expected = fused_recurrent_delta_rule_ref(q, k, v, g, beta, pool, index)
    assert rel_err(out.cpu(), expected) < 1e-5
    assert rel_err(gpu_pool[slots].cpu(), pool[slots]) < 1e-5
    assert untouched(gpu_pool, slots)


@pytest.mark.parametrize("dtype, state_dtype, bound", [(torch.bfloat16, torch.float32, 1e-2),
                                                        (torch.float32, torch.bfloat16, 1e-2)])  # fmt: skip
def test_fused_recurrent_gdn_low_precision_matches_reference(dtype, state_dtype, bound):
    slots = [4, 6]
    pool = nan_pool({s: True for s in slots}, dtype=state_dtype)
    q, k, v, g, beta = make_inputs(len(slots), dtype)
    index = torch.tensor(slots, dtype=torch.int32)
    gpu_pool = pool.cuda()
    out = fused_recurrent_delta_rule(*cuda(q, k, v, g, beta), gpu_pool, index.cuda())
    expected = fused_recurrent_delta_rule_ref(q, k, v, g, beta, pool, index)
    assert out.dtype == dtype and gpu_pool.dtype == state_dtype
    assert rel_err(out.cpu().float(), expected.float()) < bound
    assert rel_err(gpu_pool[slots].cpu().float(), pool[slots].float()) < bound
    assert untouched(gpu_pool, slots)


@pytest.mark.parametrize("options", [{"launch_pdl": True}, {"evict_first": True}])
def test_fused_recurrent_launch_options_match_reference(options):
    # a chain of launches on distinct pools, as the layers of one decode step
    slots = [3, 1, 6]
    pools = [nan_pool({s: True for s in slots}) for _ in range(3)]
    inputs = [make_inputs(len(slots), torch.bfloat16) for _ in pools]
    index = torch.tensor(slots, dtype=torch.int32)
    gpu_pools = [p.cuda() for p in pools]
    outs = [gpu_delta_rule.fused_recurrent_delta_rule(*cuda(*x), p, index.cuda(), **options)
            for x, p in zip(inputs, gpu_pools)]  # fmt: skip
    for x, pool, gpu_pool, out in zip(inputs, pools, gpu_pools, outs):
        expected = fused_recurrent_delta_rule_ref(*x, pool, index)
        assert rel_err(out.cpu().float(), expected.float()) < 1e-2
        assert rel_err(gpu_pool[slots].cpu(), pool[slots]) < 1e-5
        assert untouched(gpu_pool, slots)


def test_fla_fused_recurrent_baseline_matches_reference():
    q, k, v, g, beta = make_inputs(3, torch.float32)
    state = 0.05 * torch.randn(3, HV, D, D)
    out, final = gpu_delta_rule.fused_recurrent_gdn_fla(*cuda(q, k, v, g, beta), state.cuda())
    pool = torch.cat([torch.zeros(1, HV, D, D), state])
    expected = fused_recurrent_delta_rule_ref(q, k, v, g, beta, pool, torch.tensor([1, 2, 3], dtype=torch.int32))
    assert rel_err(out.cpu(), expected) < 1e-5 and rel_err(final.cpu(), pool[1:]) < 1e-5


def test_prefill_then_decode_equals_one_prefill():
    q, k, v, g, beta = cuda(*make_inputs(100, torch.bfloat16))
    slot = torch.tensor([4], dtype=torch.int32).cuda()
    no_init = torch.tensor([False]).cuda()
    one, split = nan_pool({}).cuda(), nan_pool({}).cuda()
    full = chunk_delta_rule(q, k, v, g, beta, one, torch.tensor([0, 100], dtype=torch.int32).cuda(), slot, no_init)
    head = chunk_delta_rule(q[:96], k[:96], v[:96], g[:96], beta[:96], split,
                            torch.tensor([0, 96], dtype=torch.int32).cuda(), slot, no_init)  # fmt: skip
    tail = [fused_recurrent_delta_rule(q[t : t + 1], k[t : t + 1], v[t : t + 1], g[t : t + 1], beta[t : t + 1], split,
                                       slot) for t in range(96, 100)]  # fmt: skip
    assert rel_err(torch.cat([head, *tail]).float(), full.float()) < 2e-2
    assert rel_err(split[4], one[4]) < 2e-2


@pytest.mark.parametrize("projection", ["qkvz", "split"])
def test_layer_on_cuda_matches_layer_on_cpu(projection):
    hidden, heads_k, heads_v, dim = 64, 2, 4, 32
    layer = GatedDeltaNet(hidden, heads_k, heads_v, dim, dim, projection=projection).eval()
    with torch.no_grad():
        for param in layer.parameters():
            param.normal_(0, 0.2)
        layer.A_log.copy_(torch.empty(heads_v).uniform_(0.01, 16).log())
    layout = gdn_layout(heads_k, heads_v, dim, dim, model_dtype=torch.float32, ssm_dtype="float32")
    pools = [nan_state_pool("gdn", layout) for _ in range(2)]
    gpu_pool = pools[1]
    gpu_pool.conv["gdn"], gpu_pool.recurrent["gdn"] = gpu_pool.conv["gdn"].cuda(), gpu_pool.recurrent["gdn"].cuda()
    gpu_layer = GatedDeltaNet(hidden, heads_k, heads_v, dim, dim, projection=projection).cuda().eval()
    gpu_layer.load_state_dict(layer.state_dict())
    layer.bind_state(pools[0].layer_state("gdn", 0), layout)
    gpu_layer.bind_state(gpu_pool.layer_state("gdn", 0), layout)
    slots, lengths = [2, 5], [9, 70]
    xs = [torch.randn(n, hidden) for n in lengths]
    steps = [torch.randn(1, hidden) for _ in slots]
    for pool in pools:
        pool.conv["gdn"][:, slots] = 0
        pool.recurrent["gdn"][:, slots] = 0
    cpu = [run_layer(layer, xs, lengths, [0, 0], slots), run_layer(layer, steps, [1, 1], lengths, slots)]
    gpu = [run_layer(gpu_layer, [x.cuda() for x in xs], lengths, [0, 0], slots),
           run_layer(gpu_layer, [x.cuda() for x in steps], [1, 1], lengths, slots)]  # fmt: skip
    for a, b in zip(gpu, cpu):
        assert rel_err(a.cpu(), b) < 5e-3
    assert rel_err(gpu_pool.recurrent["gdn"].cpu()[:, slots], pools[0].recurrent["gdn"][:, slots]) < 5e-3
    assert gpu_pool.recurrent["gdn"][:, [0, 1, 3, 4, 6]].isnan().all()
