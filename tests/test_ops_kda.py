"""KDA ops on a slot pool vs transformers' naive per-token and chunked Kimi delta attention, per sequence."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import rel_err
from transformers import KimiLinearConfig
from transformers.models.kimi_linear import modeling_kimi_linear as tf

from deltaserve.ops.kda import chunk_kda, fused_recurrent_kda, kda_gate, kda_gates

H, DK, DV, NUM_SLOTS = 2, 16, 16, 6
BOUND = 1e-5


def make_inputs(num_tokens: int, decay: str = "mild", dtype=torch.float32):
    q, k = torch.randn(num_tokens, H, DK), torch.randn(num_tokens, H, DK)
    v = torch.randn(num_tokens, H, DV)
    if decay == "mild":
        # slow forgetting: terms far back in a chunk and across chunks matter
        g = -0.05 * torch.rand(num_tokens, H, DK)
    else:
        # checkpoint-like init (transformers' _init_weights): A in [1, 16], dt in [1e-3, 1e-1]
        A_log = torch.empty(H).uniform_(1, 16).log()
        dt = torch.empty(H * DK).uniform_(math.log(1e-3), math.log(1e-1)).exp()
        g = kda_gate(torch.randn(num_tokens, H * DK), A_log, dt + torch.log(-torch.expm1(-dt)))
    beta = torch.rand(num_tokens, H).sigmoid()
    return q.to(dtype), k.to(dtype), v.to(dtype), g, beta.to(dtype)


def nan_pool(used: dict[int, bool]) -> torch.Tensor:
    """``[NUM_SLOTS+1, H, DV, DK]`` float32 of NaN; used slots get a random (True) or zero (False) state."""
    pool = torch.full((NUM_SLOTS + 1, H, DV, DK), float("nan"))
    for slot, random_state in used.items():
        pool[slot] = 0.1 * torch.randn(H, DV, DK) if random_state else 0.0
    return pool


def reference(fn, q, k, v, g, beta, state_vk, **kwargs):
    """transformers' op on one sequence; ``state_vk [H, V, K]`` (pool order) or None. Returns (o, state [H, V, K])."""
    initial = None if state_vk is None else state_vk.transpose(-1, -2).unsqueeze(0)
    o, final = fn(q[None], k[None], v[None], g[None], beta[None], initial_state=initial,
                  output_final_state=True, use_qk_l2norm_in_kernel=kwargs.pop("l2norm", True), **kwargs)  # fmt: skip
    return o[0], final[0].transpose(-1, -2)


def cu_of(lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def run_chunk(lengths, slots, has_init, decay="mild", **kwargs):
    pool = nan_pool({s: h for s, h in zip(slots, has_init)})
    before = pool.clone()
    inputs = make_inputs(sum(lengths), decay)
    index = torch.tensor(slots, dtype=torch.int32)
    o = chunk_kda(*inputs, pool, cu_of(lengths), index, torch.tensor(has_init), **kwargs)
    return inputs, before, pool, o


def test_kda_gate_matches_transformers_forget_gate():
    config = KimiLinearConfig(hidden_size=32, linear_attn_config={"num_heads": H, "head_dim": DK})
    gate = tf.KimiLinearForgetGate(config)
    with torch.no_grad():
        gate.A_log.copy_(torch.empty(1, 1, H, 1).uniform_(1, 16).log())
        gate.dt_bias.normal_()
    x = 3 * torch.randn(1, 9, 32)
    with torch.no_grad():
        expected = gate(x)[0]
        g = kda_gate(gate.f_b_proj(gate.f_a_proj(x[0])), gate.A_log, gate.dt_bias)
    assert g.dtype == torch.float32 and g.shape == (9, H, DK)
    assert rel_err(g, expected) < 1e-6


@pytest.mark.parametrize("decay", ["mild", "checkpoint"])
@pytest.mark.parametrize("chunk_size", [64, 16])
def test_chunk_kda_varlen_matches_naive_recurrent(decay, chunk_size):
    lengths, slots, has_init = [1, 7, 64, 130], [4, 1, 6, 2], [True, False, True, True]
    (q, k, v, g, beta), before, pool, o = run_chunk(lengths, slots, has_init, decay, chunk_size=chunk_size)
    cu = cu_of(lengths)
    for b, slot in enumerate(slots):
        s, e = cu[b], cu[b + 1]
        exp_o, exp_state = reference(tf.recurrent_kimi_delta_attention, q[s:e], k[s:e], v[s:e], g[s:e], beta[s:e],
                                     before[slot] if has_init[b] else None)  # fmt: skip
        assert rel_err(o[s:e], exp_o) < BOUND, f"output of sequence {b}"
        assert rel_err(pool[slot], exp_state) < BOUND, f"state of sequence {b}"


def test_chunk_kda_matches_transformers_chunked():
    lengths, slots, has_init = [5, 70], [3, 5], [True, False]
    (q, k, v, g, beta), before, pool, o = run_chunk(lengths, slots, has_init)
    cu = cu_of(lengths)
    for b, slot in enumerate(slots):
        s, e = cu[b], cu[b + 1]
        exp_o, exp_state = reference(tf.chunk_kimi_delta_attention, q[s:e], k[s:e], v[s:e], g[s:e], beta[s:e],
                                     before[slot] if has_init[b] else None, chunk_size=64)  # fmt: skip
        assert rel_err(o[s:e], exp_o) < BOUND
        assert rel_err(pool[slot], exp_state) < BOUND


def test_chunk_kda_without_l2norm_matches_naive():
    q, k, v, g, beta = make_inputs(20)
    k = 0.2 * k
    pool = nan_pool({1: True})
    before = pool.clone()
    o = chunk_kda(q, k, v, g, beta, pool, cu_of([20]), torch.tensor([1], dtype=torch.int32), torch.tensor([True]),
                  use_qk_l2norm_in_kernel=False, chunk_size=8)  # fmt: skip
    exp_o, exp_state = reference(tf.recurrent_kimi_delta_attention, q, k, v, g, beta, before[1], l2norm=False)
    assert rel_err(o, exp_o) < BOUND and rel_err(pool[1], exp_state) < BOUND


def test_unused_slots_stay_untouched_and_outputs_finite():
    slots = [2, 5]
    _, _, pool, o = run_chunk([3, 80], slots, [True, False])
    for slot in set(range(NUM_SLOTS + 1)) - set(slots):
        assert pool[slot].isnan().all()
    assert torch.isfinite(o).all() and torch.isfinite(pool[slots]).all()


def test_padding_rows_on_null_slot_compute_and_leave_slots_alone():
    lengths, slots = [9, 1, 1], [3, 0, 0]
    (q, k, v, g, beta), before, pool, o = run_chunk(lengths, slots, [False, False, False])
    exp_o, exp_state = reference(tf.recurrent_kimi_delta_attention, q[:9], k[:9], v[:9], g[:9], beta[:9], None)
    assert rel_err(o[:9], exp_o) < BOUND and rel_err(pool[3], exp_state) < BOUND
    for slot in (1, 2, 4, 5, 6):
        assert pool[slot].isnan().all()


def test_sequence_split_across_two_calls_equals_one_call():
    q, k, v, g, beta = make_inputs(100)
    whole, split = nan_pool({1: False}), nan_pool({1: False})
    slot = torch.tensor([1], dtype=torch.int32)
    o_whole = chunk_kda(q, k, v, g, beta, whole, cu_of([100]), slot, torch.tensor([False]))
    first = chunk_kda(q[:37], k[:37], v[:37], g[:37], beta[:37], split, cu_of([37]), slot, torch.tensor([False]))
    second = chunk_kda(q[37:], k[37:], v[37:], g[37:], beta[37:], split, cu_of([63]), slot, torch.tensor([True]))
    assert rel_err(torch.cat([first, second]), o_whole) < BOUND
    assert rel_err(split[1], whole[1]) < BOUND
    exp_o, exp_state = reference(tf.recurrent_kimi_delta_attention, q, k, v, g, beta, None)
    assert rel_err(torch.cat([first, second]), exp_o) < BOUND and rel_err(split[1], exp_state) < BOUND


def test_fused_recurrent_matches_naive_one_step():
    slots = [6, 2, 3]
    pool = nan_pool({s: True for s in slots})
    before = pool.clone()
    q, k, v, g, beta = make_inputs(len(slots), "checkpoint")
    o = fused_recurrent_kda(q, k, v, g, beta, pool, torch.tensor(slots, dtype=torch.int32))
    for b, slot in enumerate(slots):
        one = slice(b, b + 1)
        inputs = (t[one] for t in (q, k, v, g, beta))
        exp_o, exp_state = reference(tf.recurrent_kimi_delta_attention, *inputs, before[slot])
        assert rel_err(o[one], exp_o) < BOUND and rel_err(pool[slot], exp_state) < BOUND
    for slot in (0, 1, 4, 5):
        assert pool[slot].isnan().all()


def test_decode_steps_after_prefill_match_naive_on_whole_sequences():
    lengths, slots, steps = [5, 40], [2, 4], 3
    total = [n + steps for n in lengths]
    seqs = [make_inputs(n) for n in total]
    pool = nan_pool({s: False for s in slots})
    prefill = [torch.cat([seq[i][:n] for seq, n in zip(seqs, lengths)]) for i in range(5)]
    index = torch.tensor(slots, dtype=torch.int32)
    chunk_kda(*prefill, pool, cu_of(lengths), index, torch.tensor([False, False]))
    outs = []
    for t in range(steps):
        step = [torch.stack([seq[i][n + t] for seq, n in zip(seqs, lengths)]) for i in range(5)]
        outs.append(fused_recurrent_kda(*step, pool, index))
    for b, (seq, n) in enumerate(zip(seqs, lengths)):
        exp_o, exp_state = reference(tf.recurrent_kimi_delta_attention, *seq, None)
        assert rel_err(torch.stack([o[b] for o in outs]), exp_o[n:]) < BOUND
        assert rel_err(pool[slots[b]], exp_state) < BOUND


def test_bf16_inputs_give_bf16_output_close_to_fp32():
    q, k, v, g, beta = make_inputs(30)
    lo = [t.bfloat16() for t in (q, k, v)] + [g, beta.bfloat16()]
    pool = nan_pool({1: False})
    o = chunk_kda(*lo, pool, cu_of([30]), torch.tensor([1], dtype=torch.int32), torch.tensor([False]))
    exp_o, _ = reference(tf.recurrent_kimi_delta_attention, *[t.float() for t in lo], None)
    assert o.dtype == torch.bfloat16 and pool.dtype == torch.float32
    assert rel_err(o.float(), exp_o) < 1e-2


def test_kda_gates_name_a_write_strength_of_the_wrong_shape():
    f, A_log, dt_bias = torch.randn(3, 2 * 8), torch.zeros(1, 1, 2, 1), torch.zeros(2 * 8)
    g, beta = kda_gates(f, torch.zeros(3, 2), A_log, dt_bias)
    assert g.shape == (3, 2, 8) and torch.equal(beta, torch.full((3, 2), 0.5))
    with pytest.raises(ValueError, match="b must be"):
        kda_gates(f, torch.zeros(3, 3), A_log, dt_bias)
