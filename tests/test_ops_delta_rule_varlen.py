"""recurrent_delta_rule_varlen (speculative verify and commit) vs transformers' recurrences per sequence:
GDN (per-head gate, GVA) and KDA (per-channel gate); without storing, no slot changes."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import rel_err
from test_ops_delta_rule import DK, HK, HV, cu_of, make_inputs, nan_pool, reference, slots_of
from transformers.models.kimi_linear import modeling_kimi_linear as kimi
from transformers.models.qwen3_next import modeling_qwen3_next as qwen

from deltaserve.ops.delta_rule_varlen import recurrent_delta_rule_varlen

BOUND = 1e-5
LENGTHS, SLOTS = [4, 1, 3], [5, 2, 3]  # a verify row of 1 + 3 tokens, one of one token, one of 1 + 2


def implementations():
    yield "torch", recurrent_delta_rule_varlen
    # NOTE: the Triton kernel itself under Triton's interpreter (numpy, CPU), where triton is installed.
    if os.environ.get("TRITON_INTERPRET") == "1":
        from deltaserve.ops.gpu.delta_rule_varlen import recurrent_delta_rule_varlen as kernel

        yield "triton", kernel


@pytest.mark.parametrize("name,op", list(implementations()))
@pytest.mark.parametrize("gate", ["head", "channel"])
@pytest.mark.parametrize("store", [True, False])
def test_varlen_steps_match_transformers_per_sequence(name, op, gate, store):
    q, k, v, g, beta = make_inputs(sum(LENGTHS))
    if gate == "channel":  # KDA: one decay per key channel
        g = g.unsqueeze(-1) - 0.1 * torch.rand(*g.shape, DK)
    pool = nan_pool({s: True for s in SLOTS})
    before = pool.clone()
    o = op(q, k, v, g, beta, pool, cu_of(LENGTHS), slots_of(SLOTS), store_final_state=store)
    bounds = cu_of(LENGTHS).tolist()
    group = HV // HK
    for b, slot in enumerate(SLOTS):
        rows = slice(bounds[b], bounds[b + 1])
        if gate == "head":
            exp_o, exp_state = reference(qwen.torch_recurrent_gated_delta_rule, q[rows], k[rows], v[rows], g[rows],
                                         beta[rows], before[slot])  # fmt: skip
        else:
            exp_o, exp_state = reference(kimi.recurrent_kimi_delta_attention, q[rows].repeat_interleave(group, 1),
                                         k[rows].repeat_interleave(group, 1), v[rows], g[rows], beta[rows],
                                         before[slot])  # fmt: skip
        assert rel_err(o[rows], exp_o) < BOUND
        if store:
            assert rel_err(pool[slot], exp_state) < BOUND
    untouched = [s for s in range(pool.shape[0]) if not store or s not in SLOTS]
    assert torch.equal(pool[untouched].nan_to_num(7.0), before[untouched].nan_to_num(7.0))
