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
    # NOTE: the ranks' tensors stacked along dim 0 (what gloo and NCCL both accept), then moved.
    out = torch.empty((group.world_size * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # renamed in torch 2.13
    gather(out, x.contiguous(), group=group.device_group)
    out = out.view(group.world_size, *x.shape)
    # [W, ..., d, ...] -> [..., W*d, ...]
    return out.movedim(0, dim).reshape(*x.shape[:dim], group.world_size * x.shape[dim], *x.shape[dim + 1 :])
