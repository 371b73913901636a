"""Collectives over the TP group's device group; at TP 1 each is the identity (no copy, no call)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from deltaserve.distributed.parallel_state import get_tp_group


def tensor_model_parallel_all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum of ``x`` over the ranks, in place (returns ``x``)."""
    group = get_tp_group()
    if group.world_size == 1:
        return x
    dist.all_reduce(x, group=group.device_group)
    return x


def tensor_model_parallel_all_gather(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """The ranks' ``x`` side by side along ``dim`` (rank order); same shape on every rank."""
    group = get_tp_group()
    if group.world_size == 1:
        return x
    dim = dim % x.dim()
    out = torch.empty((group.world_size, *x.shape), dtype=x.dtype, device=x.device)
    dist.all_gather_into_tensor(out, x.contiguous(), group=group.device_group)
    # [W, ..., d, ...] -> [..., W*d, ...]
    return out.movedim(0, dim).reshape(*x.shape[:dim], group.world_size * x.shape[dim], *x.shape[dim + 1 :])
