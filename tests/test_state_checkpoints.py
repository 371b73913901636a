"""States saved inside a prefill (prefix-cache checkpoints), KDA and GDN, at op and layer level.

A checkpoint after ``p`` new tokens must hold the states a prefill of only those ``p`` tokens ends
with (the "uncut" states of the same forward): the recurrent state from the shared chunked delta
rule (per-channel gate for KDA, per-head gate with GVA for GDN) and the conv window. Checked against
prefills cut at ``p`` and against a float64 token-by-token recurrence; the outputs of the forward
must not change; the round-splitting wrapper of the GPU path must agree with the in-chunk capture.
"""

from __future__ import annotations

import pytest
import torch
from conftest import rel_err
from helpers_layer import nan_pool, run_layer, slot_states

from deltaserve.forward_context import StateCheckpoints
from deltaserve.ops.conv1d import causal_conv1d_fn
from deltaserve.ops.delta_rule import chunk_delta_rule, chunk_delta_rule_ref, l2norm

HK, HV, DK, DV, NUM_SLOTS = 2, 4, 16, 8, 12
LENGTHS = [200, 70, 300]  # three sequences; checkpoints below at chunk boundaries 64, 128, 192, 256
CUTS = [[(64, 5), (192, 6)], [], [(128, 7), (256, 8)]]


def inputs(gate: str, seed: int = 0):
    torch.manual_seed(seed)
    n = sum(LENGTHS)
    q, k = torch.randn(n, HK, DK), torch.randn(n, HK, DK)
    v, beta = torch.randn(n, HV, DV), torch.rand(n, HV)
    # NOTE: a mild decay, so that terms far back (across several chunks) matter
    g = -0.05 * torch.rand(n, HV, DK) if gate == "kda" else -0.05 * torch.rand(n, HV)
    return q, k, v, g, beta


def cu_of(lengths: list[int]) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def pool_with(initial: dict[int, bool]) -> torch.Tensor:
    pool = torch.full((NUM_SLOTS + 1, HV, DV, DK), float("nan"))
    for slot, random_state in initial.items():
        pool[slot] = 0.1 * torch.randn(HV, DV, DK) if random_state else 0.0
    return pool


def naive_state(q, k, v, g, beta, state: torch.Tensor) -> torch.Tensor:
    """float64 token-by-token delta rule of one sequence; ``state [Hv, V, K]`` (pool order) -> same."""
    group = HV // HK
    q, k = l2norm(q.double()).repeat_interleave(group, 1), l2norm(k.double()).repeat_interleave(group, 1)
    s = state.double().transpose(-1, -2)  # [Hv, K, V]
    for t in range(q.shape[0]):
        decay = g[t].double().exp()
        s = s * (decay.unsqueeze(-1) if decay.dim() == 2 else decay.view(-1, 1, 1))
        delta = (v[t].double() - torch.einsum("hk,hkv->hv", k[t], s)) * beta[t].double().unsqueeze(-1)
        s = s + torch.einsum("hk,hv->hkv", k[t], delta)
    return s.transpose(-1, -2)


@pytest.mark.parametrize("gate", ["kda", "gdn"])
def test_checkpoint_states_equal_a_prefill_cut_there_and_a_float64_recurrence(gate):
    q, k, v, g, beta = inputs(gate)
    cu, slots = cu_of(LENGTHS), torch.tensor([1, 2, 3], dtype=torch.int32)
    initial = torch.tensor([True, False, True])
    pool = pool_with({1: True, 2: True, 3: True})
    start_states = pool.clone()
    plain = pool.clone()
    checkpoints = StateCheckpoints.from_batch(CUTS, LENGTHS, [1, 2, 3])
    out = chunk_delta_rule(q, k, v, g, beta, pool, cu, slots, initial, checkpoints=checkpoints)
    out_plain = chunk_delta_rule(q, k, v, g, beta, plain, cu, slots, initial)
    assert torch.equal(out, out_plain) and torch.equal(pool[1:4], plain[1:4])  # the forward is unchanged
    bounds = cu.tolist()
    for b, cuts in enumerate(CUTS):
        for offset, target in cuts:
            rows = slice(bounds[b], bounds[b] + offset)
            cut = start_states.clone()
            chunk_delta_rule(q[rows], k[rows], v[rows], g[rows], beta[rows], cut, cu_of([offset]),
                             slots[b : b + 1], initial[b : b + 1])  # fmt: skip
            assert rel_err(pool[target], cut[b + 1]) < 1e-6
            start = start_states[b + 1] if initial[b] else torch.zeros(HV, DV, DK)
            expected = naive_state(q[rows], k[rows], v[rows], g[rows], beta[rows], start)
            assert rel_err(pool[target].double(), expected) < 1e-5
    untouched = [s for s in range(4, NUM_SLOTS + 1) if s not in (5, 6, 7, 8)]
    assert pool[untouched].isnan().all()


def test_conv_windows_at_checkpoints_are_the_inputs_before_them():
    dim, kernel, state_len = 6, 4, 5  # state_len = kernel - 1 + 2 speculative tokens
    x = torch.randn(sum(LENGTHS), dim)
    weight = torch.randn(dim, kernel)
    conv = torch.full((NUM_SLOTS + 1, state_len, dim), float("nan"))
    conv[1:4] = torch.randn(3, state_len, dim)
    start_states = conv.clone()
    cu, slots, initial = cu_of(LENGTHS), torch.tensor([1, 2, 3], dtype=torch.int32), torch.tensor([True, False, True])
    checkpoints = StateCheckpoints.from_batch(CUTS, LENGTHS, [1, 2, 3])
    causal_conv1d_fn(x, weight, conv, cu, slots, initial, "silu", checkpoints)
    bounds = cu.tolist()
    for b, cuts in enumerate(CUTS):
        for offset, target in cuts:
            rows = slice(bounds[b], bounds[b] + offset)
            cut = start_states.clone()
            causal_conv1d_fn(x[rows], weight, cut, cu_of([offset]), slots[b : b + 1], initial[b : b + 1], "silu")
            assert torch.equal(conv[target], cut[b + 1])
            assert torch.equal(conv[target], x[bounds[b] + offset - state_len : bounds[b] + offset])


@pytest.mark.parametrize("kind", ["kda", "gdn"])
def test_layer_checkpoints_hold_both_states_of_a_forward_cut_there(kind):
    """A KDA and a GDN layer (the shared mixer code): conv windows of q|k|v and the recurrent state
    at 64 and 128 equal what a forward of only those tokens leaves in its slot (DS conv pool for GDN)."""
    layer, pool = make_layer(kind)
    torch.manual_seed(3)
    hidden = torch.randn(150, layer.hidden_size)
    out = run_layer(layer, [hidden], [150], [0], [1], checkpoints=[[(64, 2), (128, 3)]])
    assert rel_err(out, run_layer(layer, [hidden], [150], [0], [1])) < 1e-6
    for offset, target in ((64, 2), (128, 3)):
        run_layer(layer, [hidden[:offset]], [offset], [0], [1])  # slot 1: the state after `offset` tokens
        (conv, recurrent), (conv_cut, recurrent_cut) = slot_states(pool, kind, target), slot_states(pool, kind, 1)
        assert rel_err(recurrent, recurrent_cut) < 1e-6 and torch.equal(conv, conv_cut)


def test_bad_checkpoints_are_clear_errors():
    q, k, v, g, beta = (t[:100] for t in inputs("kda"))
    pool, cu = pool_with({1: False}), cu_of([100])
    slots, initial = torch.tensor([1], dtype=torch.int32), torch.tensor([False])
    for cuts, field in (([(32, 2)], "offsets"), ([(128, 2)], "offsets"), ([(64, NUM_SLOTS + 1)], "slots")):
        with pytest.raises(ValueError, match=f"checkpoints.{field}"):
            chunk_delta_rule(q, k, v, g, beta, pool, cu, slots, initial,
                             checkpoints=StateCheckpoints.from_batch([cuts], [100], [1]))  # fmt: skip


def make_layer(kind: str):
    """A layer with random weights bound to a NaN-filled one-layer pool of 6 slots."""
    from transformers import Qwen3NextConfig

    from deltaserve.layers.gdn import GatedDeltaNet
    from deltaserve.layers.kda import KimiDeltaAttention
    from deltaserve.state.layout import gdn_layout, kda_layout

    torch.manual_seed(2)
    if kind == "kda":
        layer, layout = KimiDeltaAttention(32, 2, 16, conv_kernel_size=4), kda_layout(2, 16, model_dtype=torch.float32)
    else:
        config = Qwen3NextConfig(hidden_size=32, num_hidden_layers=2, layer_types=["linear_attention", "full_attention"],
                                 linear_num_key_heads=HK, linear_num_value_heads=HV, linear_key_head_dim=DK,
                                 linear_value_head_dim=DV, linear_conv_kernel_dim=4, num_attention_heads=2,
                                 num_key_value_heads=1, head_dim=16, vocab_size=64)  # fmt: skip
        layer = GatedDeltaNet.from_config(config, layer_idx=0, projection="qkvz")
        layout = gdn_layout(HK, HV, DK, DV, conv_kernel_size=4, conv_layout="DS", model_dtype=torch.float32,
                            ssm_dtype="float32")  # fmt: skip
    with torch.no_grad():
        for param in layer.parameters():
            param.normal_(0, 0.3)
        layer.A_log.fill_(-1.0)
    pool = nan_pool(kind, layout)
    layer.eval().bind_state(pool.layer_state(kind, 0), layout)
    return layer, pool
