"""The memory a connector registers, and the descriptor list that moves one request.

Every registered tensor is ``[num_layers, num_items, *item]`` and contiguous, its items indexed by
state slot (the pool's conv and recurrent tensors) or by KV block (the paged KV cache). A request's
transfer is one descriptor per (tensor, layer, item): all layers, both states, every KV block, in
one list built with numpy, the same order on both sides (groups by name, conv before recurrent,
then the KV cache).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from deltaserve.state.pool import StatePool


@dataclass(frozen=True)
class Region:
    """One registered tensor as addresses: item ``i`` of layer ``l`` starts at
    ``base + l * layer_stride + i * item_stride`` and is ``item_bytes`` long."""

    name: str
    index: str  # "slot" or "block"
    base: int
    num_layers: int
    num_items: int
    layer_stride: int
    item_stride: int
    item_bytes: int
    device_id: int

    @classmethod
    def of(cls, name: str, index: str, tensor: torch.Tensor) -> "Region":
        if not tensor.is_contiguous():
            raise ValueError(f"region {name}: a registered tensor must be contiguous")
        size = tensor.element_size()
        item = tensor[0, 0].numel() * size
        return cls(name, index, tensor.data_ptr(), tensor.shape[0], tensor.shape[1], tensor.stride(0) * size,
                   tensor.stride(1) * size, item, max(tensor.get_device(), 0))

    def to_dict(self) -> dict:
        return asdict(self)


def pool_regions(pool: StatePool, kv_cache: torch.Tensor | None) -> list[tuple[Region, torch.Tensor]]:
    """The pool's tensors and the KV cache with their regions, in transfer order."""
    out = []
    for name in sorted(pool.groups):
        out.append((Region.of(f"{name}.conv", "slot", pool.conv[name]), pool.conv[name]))
        recurrent = pool.recurrent[name]
        if recurrent is not None:
            out.append((Region.of(f"{name}.recurrent", "slot", recurrent), recurrent))
    if kv_cache is not None and kv_cache.numel() > 0:
        out.append((Region.of("kv", "block", kv_cache), kv_cache))
    return out


def request_descs(regions: list[Region], slot: int, block_ids: list[int]) -> np.ndarray:
    """``[n, 3]`` uint64 rows ``(address, bytes, device)``: the request's slot in every layer of every
    slot region, then each of its blocks in every layer of every block region."""
    blocks = np.asarray(block_ids, dtype=np.uint64)
    rows = []
    for region in regions:
        items = np.asarray([slot], dtype=np.uint64) if region.index == "slot" else blocks
        for item in items.tolist():
            if not 0 <= item < region.num_items:
                raise ValueError(f"region {region.name}: {region.index} {item} is outside [0, {region.num_items})")
        layers = np.arange(region.num_layers, dtype=np.uint64)[:, None]
        addr = (region.base + layers * region.layer_stride + items[None, :] * region.item_stride).ravel()
        block = np.empty((addr.size, 3), dtype=np.uint64)
        block[:, 0] = addr
        block[:, 1] = region.item_bytes
        block[:, 2] = region.device_id
        rows.append(block)
    return np.concatenate(rows) if rows else np.empty((0, 3), dtype=np.uint64)


def request_bytes(regions: list[Region], num_blocks: int) -> int:
    """Bytes one request moves: its slot in every slot region plus ``num_blocks`` blocks of every block region."""
    return sum(r.num_layers * r.item_bytes * (1 if r.index == "slot" else num_blocks) for r in regions)
