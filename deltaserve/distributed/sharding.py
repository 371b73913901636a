"""Which slice of a checkpoint tensor this rank holds, and reading only that slice.

A *loaded weight* is what the loader hands a ``weight_loader``: a safetensors slice
(``safe_open(...).get_slice(name)``, read lazily: indexing reads only the indexed rows) or a tensor.
"""

from __future__ import annotations

from typing import Callable

import torch

from deltaserve.distributed.parallel_state import get_tp_group
from deltaserve.state.layout import divide

WeightSlot = tuple[tuple[int, ...], Callable[[object], None]]


def loaded_shape(loaded) -> tuple[int, ...]:
    return tuple(loaded.shape) if isinstance(loaded, torch.Tensor) else tuple(loaded.get_shape())


def read_loaded(loaded, dim: int | None = None, start: int = 0, length: int | None = None) -> torch.Tensor:
    """``loaded`` whole (``dim`` None), or rows ``start:start+length`` along ``dim``; reads only those."""
    shape = loaded_shape(loaded)
    index = [slice(None)] * len(shape)
    if dim is not None:
        index[dim] = slice(start, start + (shape[dim] - start if length is None else length))
    # NOTE: a safetensors slice needs an index (a 0-dim tensor takes `...`).
    return loaded[tuple(index)] if index else loaded[...]


def shard_size(size: int, what: str) -> tuple[int, int]:
    # NOTE: read when a layer is built; layers keep their rank, so loading needs no group.
    """``(start, length)`` of this rank's equal share of ``size``; ValueError naming ``what`` if it does not divide."""
    group = get_tp_group()
    local = divide(size, group.world_size, what)
    return group.rank * local, local


def copy_shard(param: torch.Tensor, loaded, dim: int | None, rank: int) -> None:
    """Copy rank ``rank``'s slice of ``loaded`` along ``dim`` (the size of ``param`` there) into ``param``."""
    if dim is None or param.shape[dim] == loaded_shape(loaded)[dim]:
        param.data.copy_(read_loaded(loaded))
        return
    local = param.shape[dim]
    param.data.copy_(read_loaded(loaded, dim, rank * local, local))


def read_blocks(loaded, block_sizes: list[int], rank: int, world_size: int, dim: int = 0) -> torch.Tensor:
    """Rank ``rank``'s share of every block of ``loaded`` along ``dim`` (blocks of ``block_sizes`` side by
    side, e.g. ``[q | k | v]``), concatenated in block order; one read per block."""
    parts, offset = [], 0
    for size in block_sizes:
        local = size // world_size
        parts.append(read_loaded(loaded, dim, offset + rank * local, local))
        offset += size
    return torch.cat(parts, dim=dim)


def blocks_slot(module: torch.nn.Module, name: str, block_sizes: list[int], rank: int, world_size: int) -> WeightSlot:
    """The loader slot of a parameter whose dim 0 holds ``block_sizes`` blocks, each split over the ranks."""
    shape = (sum(block_sizes), *getattr(module, name).shape[1:])
    return shape, lambda loaded: getattr(module, name).data.copy_(read_blocks(loaded, block_sizes, rank, world_size))


def sharded_slot(module: torch.nn.Module, name: str, dim: int, rank: int, world_size: int) -> WeightSlot:
    """The loader slot of parameter ``name`` of ``module`` split along ``dim`` over ``world_size`` ranks:
    the checkpoint's full shape and a loader of rank ``rank``'s slice (the parameter is looked up at
    load time: ``to_empty`` replaces parameters)."""
    shape = list(getattr(module, name).shape)
    shape[dim] *= world_size
    return tuple(shape), lambda loaded: copy_shard(getattr(module, name), loaded, dim, rank)
