"""Multi-token verify on the delta-rule layers (KDA, GDN of both projections): outputs of every
position come from the unchanged slot, and the commit of the accepted prefix leaves the states of a
run that never saw the rejected tokens (token-by-token decode of the accepted ones)."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import rel_err
from helpers_layer import nan_pool, run_layer
from test_layer_gdn import tiny_config as gdn_config
from test_layer_kda import tiny_config as kda_config

from deltaserve.forward_context import forward_context, make_forward_context
from deltaserve.layers.gdn import GatedDeltaNet
from deltaserve.layers.kda import KimiDeltaAttention
from deltaserve.spec_decode import verify as verify_module
from deltaserve.spec_decode.verify import VerifyBatch
from deltaserve.state.layout import gdn_layout, kda_layout

BOUND = 1e-6
KINDS = ["kda", "gdn-qkvz", "gdn-split"]


def make_layer(kind: str):
    """A layer with random weights of the tiny test shapes, and a function making its NaN-filled pool."""
    torch.manual_seed(2)
    if kind == "kda":
        c = kda_config()
        layer = KimiDeltaAttention.from_config(c, layer_idx=0)
        layout = kda_layout(c.linear_num_heads, c.linear_head_dim, conv_kernel_size=4, model_dtype=torch.float32)
    else:
        projection = kind.split("-")[1]
        c = gdn_config(projection)
        layer = GatedDeltaNet.from_config(c, layer_idx=0, projection=projection)
        layout = gdn_layout(c.linear_num_key_heads, c.linear_num_value_heads, c.linear_key_head_dim,
                            c.linear_value_head_dim, conv_kernel_size=4, model_dtype=torch.float32,
                            ssm_dtype="float32")  # fmt: skip
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.3)
    group = layout.kind

    def pool():
        p = nan_pool(group, layout)
        layer.bind_state(p.layer_state(group, 0), layout)
        return p

    return layer.eval(), pool, c.hidden_size, group


def states(pool, group: str, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
    conv, recurrent = pool.layer_state(group, 0)
    return conv[slot].clone(), recurrent[slot].clone()


def run_verify(layer, hidden, query_lens, num_computed, slots, num_verify) -> tuple[torch.Tensor, VerifyBatch]:
    device = hidden[0].device
    ctx = make_forward_context(query_lens, num_computed, slots, device=device)
    ctx.spec_decode = VerifyBatch(ctx, num_verify)
    positions = torch.cat([torch.arange(c, c + q) for c, q in zip(num_computed, query_lens)]).to(device)
    with torch.no_grad(), forward_context(ctx):
        return layer(positions, torch.cat(hidden)), ctx.spec_decode


# One of three drafts accepted in the first row and both in the second; or every draft.
ACCEPTED = {"some": [2, 3], "all": [4, 3]}


# NOTE: "varlen" is the GPU's conv path (one varlen call per layer) with the torch references; "triton"
# adds the GPU delta-rule kernel itself, on the CPU under Triton's interpreter (TRITON_INTERPRET=1, triton
# installed; the conv kernels use a scalar mask the interpreter refuses, so their torch references run).
PATHS = ["steps", "varlen"] + (["triton"] if os.environ.get("TRITON_INTERPRET") == "1" else [])


@pytest.mark.parametrize("accept", list(ACCEPTED))
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("kind", KINDS)
def test_commit_leaves_the_states_of_a_run_without_the_rejected_tokens(kind, path, accept, monkeypatch):
    monkeypatch.setattr(verify_module, "_conv_steps", lambda x: path == "steps")
    if path == "triton":
        from deltaserve.ops.gpu import delta_rule_varlen

        monkeypatch.setattr(verify_module, "recurrent_delta_rule_varlen", delta_rule_varlen.recurrent_delta_rule_varlen)
    layer, make_pool, hidden, group = make_layer(kind)
    prompts = [torch.randn(n, hidden) for n in (5, 70, 6)]  # the second spans two 64-token chunks
    verify = [torch.randn(4, hidden), torch.randn(3, hidden)]  # last sampled token + 3 (2) drafts
    prefill = torch.randn(9, hidden)  # a third sequence's prompt chunk in the same forward
    computed = [5, 70, 6]

    plain = make_pool()
    slots = plain.allocate(3)
    run_layer(layer, prompts, computed, [0, 0, 0], slots)
    spec = make_pool()
    assert spec.allocate(3) == slots
    run_layer(layer, prompts, computed, [0, 0, 0], slots)
    before = [states(spec, group, s) for s in slots[:2]]
    out, batch = run_verify(layer, verify + [prefill], [4, 3, 9], computed, slots, num_verify=2)
    for slot, (conv, recurrent) in zip(slots[:2], before):  # verify rows only read their slots
        assert torch.equal(states(spec, group, slot)[0], conv) and torch.equal(states(spec, group, slot)[1], recurrent)
    accepted = ACCEPTED[accept]
    batch.commit(accepted)

    # Without speculation: the accepted tokens one decode step at a time, then the prompt chunk.
    layer.bind_state(plain.layer_state(group, 0), plain.groups[group].layout)
    expected = [[], []]
    for t in range(max(accepted)):
        rows = [i for i in range(2) if t < accepted[i]]
        outs = run_layer(layer, [verify[i][t : t + 1] for i in rows], [1] * len(rows),
                         [computed[i] + t for i in rows], [slots[i] for i in rows])  # fmt: skip
        for j, i in enumerate(rows):
            expected[i].append(outs[j : j + 1])
    expected_prefill = run_layer(layer, [prefill], [9], [6], [slots[2]])
    assert rel_err(out[0 : accepted[0]], torch.cat(expected[0])) < 1e-5
    assert rel_err(out[4:7], torch.cat(expected[1])) < 1e-5
    assert rel_err(out[7:], expected_prefill) < 1e-5
    for slot in slots:
        for got, want, what in zip(states(spec, group, slot), states(plain, group, slot), ("conv", "recurrent")):
            assert not got.isnan().any(), f"{what} state of slot {slot} read unwritten memory"
            assert rel_err(got, want) < BOUND, f"{what} state of slot {slot}"


def test_commit_of_zero_tokens_leaves_the_slot_untouched():
    layer, make_pool, hidden, group = make_layer("kda")
    pool = make_pool()
    slots = pool.allocate(2)
    run_layer(layer, [torch.randn(3, hidden), torch.randn(4, hidden)], [3, 4], [0, 0], slots)
    before = states(pool, group, slots[0])
    _, batch = run_verify(layer, [torch.randn(3, hidden), torch.randn(2, hidden)], [3, 2], [3, 4], slots, 2)
    batch.commit([0, 1])
    assert all(torch.equal(a, b) for a, b in zip(states(pool, group, slots[0]), before))
    with pytest.raises(ValueError, match=r"num_accepted_tokens\[1\] = 3 must be in 0..2"):
        batch.commit([1, 3])
