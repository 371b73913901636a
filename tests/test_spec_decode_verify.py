"""Multi-token verify on a KDA layer: outputs of all positions from the unchanged slot, and a commit of
the accepted prefix that leaves the states of a run that never saw the rejected tokens."""

from __future__ import annotations

import pytest
import torch
from conftest import rel_err
from test_layer_kda import H, HIDDEN, layers, make_pool, run_ours  # noqa: F401 (fixture)

from deltaserve.forward_context import forward_context, make_forward_context
from deltaserve.layers.kda import KimiDeltaAttention
from deltaserve.spec_decode.verify import VerifyBatch

BOUND = 1e-6


def bind(layer: KimiDeltaAttention, pool) -> None:
    layer.bind_state(pool.layer_state("kda", 0), pool.groups["kda"].layout)


def states(pool, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
    conv, recurrent = pool.layer_state("kda", 0)
    return conv[slot].clone(), recurrent[slot].clone()


def run_verify(layer, hidden, query_lens, num_computed, slots, num_verify) -> tuple[torch.Tensor, VerifyBatch]:
    ctx = make_forward_context(query_lens, num_computed, slots)
    ctx.spec_decode = VerifyBatch(ctx, num_verify)
    positions = torch.cat([torch.arange(c, c + q) for c, q in zip(num_computed, query_lens)])
    with torch.no_grad(), forward_context(ctx):
        return layer(positions, torch.cat(hidden)), ctx.spec_decode


@pytest.mark.parametrize("conv_layout", ["SD", "DS"])
def test_commit_leaves_the_states_of_a_run_without_the_rejected_tokens(layers, conv_layout):  # noqa: F811
    _, layer, _ = layers
    torch.manual_seed(3)
    prompts = [torch.randn(n, HIDDEN) for n in (5, 70, 6)]  # the second spans two 64-token chunks
    verify = [torch.randn(4, HIDDEN), torch.randn(4, HIDDEN)]  # last sampled token + 3 drafts each
    prefill = torch.randn(9, HIDDEN)  # a third sequence's prompt chunk in the same forward

    spec, plain = make_pool(conv_layout=conv_layout), make_pool(conv_layout=conv_layout)
    slots = spec.allocate(3)
    assert plain.allocate(3) == slots
    for pool in (spec, plain):
        bind(layer, pool)
        run_ours(layer, prompts, [5, 70, 6], [0, 0, 0], slots)

    bind(layer, spec)
    before = [states(spec, s) for s in slots[:2]]
    out, batch = run_verify(layer, verify + [prefill], [4, 4, 9], [5, 70, 6], slots, num_verify=2)
    for slot, (conv, recurrent) in zip(slots[:2], before):
        assert torch.equal(states(spec, slot)[0], conv) and torch.equal(states(spec, slot)[1], recurrent)
    accepted = [2, 4]  # one draft accepted in the first row, all three in the second
    batch.commit(accepted)

    # The run without speculation: the accepted tokens one decode step at a time, the prefill chunk once.
    bind(layer, plain)
    expected = [[], []]
    for t in range(4):
        rows = [i for i in range(2) if t < accepted[i]] if t else [0, 1]
        outs = run_ours(layer, [verify[i][t : t + 1] for i in rows], [1] * len(rows),
                        [[5, 70][i] + t for i in rows], [slots[i] for i in rows])  # fmt: skip
        for j, i in enumerate(rows):
            expected[i].append(outs[j : j + 1])
    expected_prefill = run_ours(layer, [prefill], [9], [6], [slots[2]])
    for i, n in enumerate(accepted):
        got = out[4 * i : 4 * i + n]
        assert rel_err(got, torch.cat(expected[i])) < 1e-5, f"verify outputs of row {i}"
    assert rel_err(out[8:], expected_prefill) < 1e-5
    for slot in slots:
        for got, want, what in zip(states(spec, slot), states(plain, slot), ("conv", "recurrent")):
            assert not got.isnan().any(), f"{what} state of slot {slot} read unwritten memory"
            assert rel_err(got, want) < BOUND, f"{what} state of slot {slot}"


def test_commit_of_zero_tokens_leaves_the_slot_untouched(layers):  # noqa: F811
    _, layer, _ = layers
    pool = make_pool()
    slots = pool.allocate(2)
    bind(layer, pool)
    run_ours(layer, [torch.randn(3, HIDDEN), torch.randn(4, HIDDEN)], [3, 4], [0, 0], slots)
    before = states(pool, slots[0])
    _, batch = run_verify(layer, [torch.randn(3, HIDDEN), torch.randn(2, HIDDEN)], [3, 2], [3, 4], slots, 2)
    batch.commit([0, 1])
    assert all(torch.equal(a, b) for a, b in zip(states(pool, slots[0]), before))
    with pytest.raises(ValueError, match=r"num_accepted_tokens\[1\] = 3 must be in 0..2"):
        batch.commit([1, 3])
