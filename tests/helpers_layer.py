"""What the delta-rule layer tests (KDA, GDN) share: a NaN-filled one-layer pool, a forward over a flat
batch, the states a slot holds, transformers' layer on one sequence with its own cache, and the mixed-batch and
decode-step checks of a layer against it."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F
from conftest import rel_err
from transformers.cache_utils import DynamicCache

from deltaserve.forward_context import forward_context, make_forward_context
from deltaserve.state.layout import StateLayout
from deltaserve.state.pool import StateGroup, StatePool


def nan_pool(group: str, layout: StateLayout, num_slots: int = 6) -> StatePool:
    """One layer's pool with NaN in every slot (``allocate()`` zeroes the slots handed out)."""
    pool = StatePool({group: StateGroup(layout, num_layers=1)}, num_slots=num_slots)
    pool.conv[group].fill_(float("nan"))
    pool.recurrent[group].fill_(float("nan"))
    return pool


def run_layer(layer, hidden: list[torch.Tensor], query_lens, num_computed, slots, checkpoints=None) -> torch.Tensor:
    """``layer`` over the flat batch of ``hidden`` (one tensor per sequence), as the model runner calls it
    (``checkpoints``: per sequence, the ``(offset, slot)`` states to save inside the prefill)."""
    device = hidden[0].device
    ctx = make_forward_context(query_lens, num_computed, slots, device=device, checkpoints=checkpoints)
    positions = torch.cat([torch.arange(c, c + q) for c, q in zip(num_computed, query_lens)]).to(device)
    with torch.no_grad(), forward_context(ctx):
        return layer(positions, torch.cat(hidden))


@contextlib.contextmanager
def linear_calls() -> Iterator[list[tuple[int, int]]]:
    """Records ``(input width, output width)`` of every ``F.linear`` (one GEMM each) made inside."""
    calls, linear = [], F.linear

    def record(x, weight, bias=None):
        calls.append((weight.shape[1], weight.shape[0]))
        return linear(x, weight, bias)

    F.linear = record
    try:
        yield calls
    finally:
        F.linear = linear


def slot_states(pool: StatePool, group: str, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(conv [L, conv_dim] SD, recurrent [H, V, K])`` of one slot."""
    conv, recurrent = pool.layer_state(group, 0)
    conv = conv[slot] if pool.groups[group].layout.conv_layout == "SD" else conv[slot].t()
    return conv, recurrent[slot]


class CachedReference:
    """transformers' layer on one sequence with its own cache (``cache_kwarg``: the forward's cache argument)."""

    def __init__(self, ref, config, kernel_size: int, cache_kwarg: str = "cache"):
        self.ref, self.cache = ref, DynamicCache(config=config)
        self.kernel_size, self.cache_kwarg = kernel_size, cache_kwarg

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.ref(hidden.unsqueeze(0), **{self.cache_kwarg: self.cache})[0]

    def conv_state(self) -> torch.Tensor:
        """Last K-1 inputs, SD ``[K-1, conv_dim]`` (transformers keeps K, DS-ordered q|k|v)."""
        return self.cache.layers[0].conv_states[0][0, :, -(self.kernel_size - 1) :].t()

    def recurrent_state(self) -> torch.Tensor:
        """``[H, V, K]`` (transformers keeps ``[H, K, V]``)."""
        return self.cache.layers[0].recurrent_states[0][0].transpose(-1, -2)


def check_slot(out, expected, pool: StatePool, group: str, slot: int, reference: CachedReference, what: str,
               bound: float = 1e-5) -> None:
    """One sequence's output and the conv (last K-1 inputs) and recurrent states its slot holds vs ``reference``'s."""
    conv, recurrent = slot_states(pool, group, slot)
    assert rel_err(out, expected) < bound, f"output of {what}"
    assert rel_err(conv[-(reference.kernel_size - 1) :], reference.conv_state()) < 1e-5, f"conv state of {what}"
    assert rel_err(recurrent.float(), reference.recurrent_state()) < bound, f"recurrent state of {what}"


def assert_untouched(pool: StatePool, group: str, used: list[int]) -> None:
    """Every slot but ``used`` still holds the NaN of ``nan_pool``."""
    conv, recurrent = pool.layer_state(group, 0)
    for slot in set(range(pool.num_slots + 1)) - set(used):
        assert conv[slot].isnan().all() and recurrent[slot].isnan().all(), f"slot {slot} was written"


def check_mixed_batch(layer, pool: StatePool, group: str, make_reference, hidden_size: int) -> None:
    """One forward where sequence 0 starts, 1 continues a 12-token prefix with 6 tokens and 2, 3 decode one
    token, vs ``make_reference()`` (a fresh ``CachedReference``) per sequence."""
    prefix_lens, new_lens = [0, 12, 20, 2], [9, 6, 1, 1]
    prefixes = [torch.randn(n, hidden_size) for n in prefix_lens]
    news = [torch.randn(n, hidden_size) for n in new_lens]
    slots = pool.allocate(4)
    run_layer(layer, prefixes[1:], prefix_lens[1:], [0, 0, 0], slots[1:])
    out = run_layer(layer, news, new_lens, prefix_lens, slots).split(new_lens)
    for b, slot in enumerate(slots):
        reference = make_reference()
        if prefix_lens[b]:
            reference(prefixes[b])
        check_slot(out[b], reference(news[b]), pool, group, slot, reference, f"sequence {b}")
    assert_untouched(pool, group, slots)


def check_decode_steps(layer, pool: StatePool, group: str, make_reference, hidden_size: int, steps: int = 3) -> None:
    """Two prefilled sequences decode ``steps`` tokens, with a padding row on the null slot in each batch."""
    prefix_lens = [3, 17]
    slots = pool.allocate(2)
    prefixes = [torch.randn(n, hidden_size) for n in prefix_lens]
    references = [make_reference() for _ in slots]
    run_layer(layer, prefixes, prefix_lens, [0, 0], slots)
    for reference, prefix in zip(references, prefixes):
        reference(prefix)
    for step in range(steps):
        tokens = [torch.randn(1, hidden_size) for _ in slots]
        computed = [n + step for n in prefix_lens]
        out = run_layer(layer, tokens + [torch.randn(1, hidden_size)], [1, 1, 1], computed + [1], slots + [0])
        for b, slot in enumerate(slots):
            check_slot(out[b : b + 1], references[b](tokens[b]), pool, group, slot, references[b], f"step {step}, seq {b}")
    assert_untouched(pool, group, [0, *slots])
