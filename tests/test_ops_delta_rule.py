"""The delta-rule ops with GDN's per-head gate and GVA vs transformers' Qwen3-Next torch functions, per sequence;
the same ops with the per-head gate vs transformers' KDA recurrence on the gate broadcast over the key channels."""

from __future__ import annotations

import pytest
import torch
from conftest import rel_err
from transformers.models.kimi_linear import modeling_kimi_linear as kimi
from transformers.models.qwen3_next import modeling_qwen3_next as qwen

from deltaserve.ops.delta_rule import chunk_delta_rule, fused_recurrent_delta_rule, gdn_gate

HK, HV, DK, DV, NUM_SLOTS = 2, 4, 16, 8, 6
BOUND = 1e-5


def make_inputs(num_tokens: int, num_k_heads: int = HK):
    q, k = torch.randn(num_tokens, num_k_heads, DK), torch.randn(num_tokens, num_k_heads, DK)
    v = torch.randn(num_tokens, HV, DV)
    # checkpoint-like gate: A in (0.01, 16) as transformers' init, dt_bias ~ 1
    g, beta = gdn_gate(torch.randn(num_tokens, HV), torch.randn(num_tokens, HV),
                       torch.empty(HV).uniform_(0.01, 16).log(), torch.ones(HV))  # fmt: skip
    # NOTE: a milder decay on half the heads, so that terms far back and across chunks matter
    g[:, ::2] = -0.05 * torch.rand(num_tokens, HV // 2)
    return q, k, v, g, beta


def nan_pool(used: dict[int, bool], dtype=torch.float32) -> torch.Tensor:
    """``[NUM_SLOTS+1, HV, DV, DK]`` of NaN; used slots get a random (True) or zero (False) state."""
    pool = torch.full((NUM_SLOTS + 1, HV, DV, DK), float("nan"), dtype=dtype)
    for slot, random_state in used.items():
        pool[slot] = 0.1 * torch.randn(HV, DV, DK) if random_state else 0.0
    return pool


def reference(fn, q, k, v, g, beta, state_vk, **kwargs):
    """transformers' op on one sequence; ``state_vk [Hv, V, K]`` (pool order) or None. Returns (o, state [Hv, V, K])."""
    initial = None if state_vk is None else state_vk.transpose(-1, -2).unsqueeze(0)
    o, final = fn(q[None], k[None], v[None], g[None], beta[None], initial_state=initial,
                  output_final_state=True, use_qk_l2norm_in_kernel=True, **kwargs)  # fmt: skip
    return o[0], final[0].transpose(-1, -2)


def cu_of(lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def slots_of(slots):
    return torch.tensor(slots, dtype=torch.int32)


def test_gdn_gate_matches_transformers_formula():
    a, b = 3 * torch.randn(7, HV), torch.randn(7, HV)
    A_log, dt_bias = torch.empty(HV).uniform_(0.01, 16).log(), torch.randn(HV)
    g, beta = gdn_gate(a, b, A_log, dt_bias)
    expected = -A_log.float().exp() * torch.nn.functional.softplus(a.float() + dt_bias)  # Qwen3NextGatedDeltaNet
    assert g.dtype == beta.dtype == torch.float32 and g.shape == (7, HV)
    assert rel_err(g, expected) < 1e-6 and rel_err(beta, b.sigmoid()) < 1e-6


@pytest.mark.parametrize("fn", [qwen.torch_chunk_gated_delta_rule, qwen.torch_recurrent_gated_delta_rule])
@pytest.mark.parametrize("chunk_size", [64, 16])
def test_chunk_varlen_gva_matches_transformers(fn, chunk_size):
    lengths, slots, has_init = [1, 9, 64, 90], [4, 1, 6, 2], [True, False, True, True]
    pool = nan_pool(dict(zip(slots, has_init)))
    before = pool.clone()
    q, k, v, g, beta = make_inputs(sum(lengths))
    cu = cu_of(lengths)
    o = chunk_delta_rule(q, k, v, g, beta, pool, cu, slots_of(slots), torch.tensor(has_init), chunk_size=chunk_size)
    for b, slot in enumerate(slots):
        s, e = cu[b], cu[b + 1]
        exp_o, exp_state = reference(fn, q[s:e], k[s:e], v[s:e], g[s:e], beta[s:e], before[slot] if has_init[b] else None)
        assert rel_err(o[s:e], exp_o) < BOUND, f"output of sequence {b}"
        assert rel_err(pool[slot], exp_state) < BOUND, f"state of sequence {b}"
    for slot in set(range(NUM_SLOTS + 1)) - set(slots):
        assert pool[slot].isnan().all()


def test_head_gate_equals_kda_with_the_gate_broadcast_over_key_channels():
    # GDN is KDA with g shared by a head's key channels and q/k repeated (transformers' KDA recurrence)
    q, k, v, g, beta = make_inputs(40)
    pool = nan_pool({3: True})
    before = pool.clone()
    o = chunk_delta_rule(q, k, v, g, beta, pool, cu_of([40]), slots_of([3]), torch.tensor([True]), chunk_size=16)
    group = HV // HK
    exp_o, exp_state = reference(kimi.recurrent_kimi_delta_attention, q.repeat_interleave(group, 1),
                                 k.repeat_interleave(group, 1), v, g.unsqueeze(-1).expand(-1, -1, DK), beta,
                                 before[3])  # fmt: skip
    assert rel_err(o, exp_o) < BOUND and rel_err(pool[3], exp_state) < BOUND


def test_equal_heads_without_gva_match_transformers():
    q, k, v, g, beta = make_inputs(30, num_k_heads=HV)
    pool = nan_pool({2: False})
    o = chunk_delta_rule(q, k, v, g, beta, pool, cu_of([30]), slots_of([2]), torch.tensor([False]))
    exp_o, exp_state = reference(qwen.torch_recurrent_gated_delta_rule, q, k, v, g, beta, None)
    assert rel_err(o, exp_o) < BOUND and rel_err(pool[2], exp_state) < BOUND


def test_sequence_split_across_two_calls_equals_one_call():
    q, k, v, g, beta = make_inputs(100)
    whole, split = nan_pool({1: False}), nan_pool({1: False})
    slot = slots_of([1])
    o_whole = chunk_delta_rule(q, k, v, g, beta, whole, cu_of([100]), slot, torch.tensor([False]))
    parts = [(slice(0, 37), False), (slice(37, 100), True)]
    outs = [chunk_delta_rule(q[p], k[p], v[p], g[p], beta[p], split, cu_of([p.stop - p.start]), slot,
                             torch.tensor([init])) for p, init in parts]  # fmt: skip
    assert rel_err(torch.cat(outs), o_whole) < BOUND and rel_err(split[1], whole[1]) < BOUND
    exp_o, exp_state = reference(qwen.torch_chunk_gated_delta_rule, q, k, v, g, beta, None)
    assert rel_err(torch.cat(outs), exp_o) < BOUND and rel_err(split[1], exp_state) < BOUND


def test_fused_recurrent_gva_matches_transformers_one_step():
    slots = [6, 2, 3]
    pool = nan_pool({s: True for s in slots})
    before = pool.clone()
    q, k, v, g, beta = make_inputs(len(slots))
    o = fused_recurrent_delta_rule(q, k, v, g, beta, pool, slots_of(slots))
    for b, slot in enumerate(slots):
        one = slice(b, b + 1)
        exp_o, exp_state = reference(qwen.torch_recurrent_gated_delta_rule, *(t[one] for t in (q, k, v, g, beta)),
                                     before[slot])  # fmt: skip
        assert rel_err(o[one], exp_o) < BOUND and rel_err(pool[slot], exp_state) < BOUND
    for slot in (0, 1, 4, 5):
        assert pool[slot].isnan().all()


def test_decode_steps_after_prefill_match_transformers_on_whole_sequences():
    lengths, slots, steps = [5, 70], [2, 4], 3
    seqs = [make_inputs(n + steps) for n in lengths]
    pool = nan_pool({s: False for s in slots})
    prefill = [torch.cat([seq[i][:n] for seq, n in zip(seqs, lengths)]) for i in range(5)]
    chunk_delta_rule(*prefill, pool, cu_of(lengths), slots_of(slots), torch.tensor([False, False]))
    outs = []
    for t in range(steps):
        step = [torch.stack([seq[i][n + t] for seq, n in zip(seqs, lengths)]) for i in range(5)]
        outs.append(fused_recurrent_delta_rule(*step, pool, slots_of(slots)))
    for b, (seq, n) in enumerate(zip(seqs, lengths)):
        exp_o, exp_state = reference(qwen.torch_recurrent_gated_delta_rule, *seq, None)
        assert rel_err(torch.stack([o[b] for o in outs]), exp_o[n:]) < BOUND
        assert rel_err(pool[slots[b]], exp_state) < BOUND


def test_bfloat16_state_pool_stays_close_to_float32():
    q, k, v, g, beta = make_inputs(20)
    pool = nan_pool({1: True}, dtype=torch.bfloat16)
    initial = pool[1].float()
    chunk_delta_rule(q, k, v, g, beta, pool, cu_of([20]), slots_of([1]), torch.tensor([True]))
    o = fused_recurrent_delta_rule(q[:1], k[:1], v[:1], g[:1], beta[:1], pool, slots_of([1]))
    exp_o, exp_state = reference(qwen.torch_recurrent_gated_delta_rule, q, k, v, g, beta, initial)
    _, exp_state = reference(qwen.torch_recurrent_gated_delta_rule, q[:1], k[:1], v[:1], g[:1], beta[:1], exp_state)
    assert pool.dtype == torch.bfloat16 and pool[0].isnan().all()
    assert rel_err(pool[1].float(), exp_state) < 1e-2 and o.dtype == torch.float32


def test_mismatched_heads_are_a_clear_error():
    q, k, v, g, beta = make_inputs(4, num_k_heads=3)
    with pytest.raises(ValueError, match="multiple of Hk"):
        chunk_delta_rule(q, k, v, g, beta, nan_pool({}), cu_of([4]), slots_of([1]), torch.tensor([False]))
    q, k, v, g, beta = make_inputs(4)
    with pytest.raises(ValueError, match="g must be"):
        fused_recurrent_delta_rule(q, k, v, g[:, :2], beta, nan_pool({}), slots_of([1, 2, 3, 4]))
