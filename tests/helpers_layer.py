"""What the delta-rule layer tests (KDA, GDN) share: a NaN-filled one-layer pool, a forward over a flat
batch, the states a slot holds, and transformers' layer on one sequence with its own cache."""

from __future__ import annotations

import torch
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


def run_layer(layer, hidden: list[torch.Tensor], query_lens, num_computed, slots) -> torch.Tensor:
    """``layer`` over the flat batch of ``hidden`` (one tensor per sequence), as the model runner calls it."""
    device = hidden[0].device
    ctx = make_forward_context(query_lens, num_computed, slots, device=device)
    positions = torch.cat([torch.arange(c, c + q) for c, q in zip(num_computed, query_lens)]).to(device)
    with torch.no_grad(), forward_context(ctx):
        return layer(positions, torch.cat(hidden))


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
