"""Tensor-parallel linear layers, vLLM's scheme and names.

- :class:`ColumnParallelLinear`: ``Y = X A^T`` with the rows of ``A`` (the outputs) split: each rank
  computes its slice of the outputs (heads, intermediate channels); no communication.
- :class:`MergedColumnParallelLinear`: one weight holding several column blocks side by side (e.g.
  ``[q | k | v]``); each rank takes its slice of every block.
- :class:`RowParallelLinear`: the inputs split; each rank's product is a partial sum, all-reduced
  (``reduce_results``), then the bias is added once.

Each has ``weight_loader(param, loaded_weight)`` that copies this rank's slice of the checkpoint
tensor (a safetensors slice: only that slice is read) and ``weight_loaders()`` for the model loader.
At TP 1 each is an ``nn.Linear`` with the full weight, and its forward is ``F.linear``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from deltaserve.distributed.communication_op import tensor_model_parallel_all_gather, tensor_model_parallel_all_reduce
from deltaserve.distributed.parallel_state import get_tp_group
from deltaserve.distributed.sharding import WeightSlot, copy_shard, read_blocks, read_loaded, shard_size
from deltaserve.state.layout import divide


class ColumnParallelLinear(nn.Linear):
    """``[*, input_size] -> [*, output_size / tp]`` (``gather_output``: ``[*, output_size]`` on every rank)."""

    def __init__(
        self,
        input_size: int,
        output_size: int,
        bias: bool = False,
        *,
        gather_output: bool = False,
        dtype: torch.dtype | None = None,
        what: str = "output_size",
    ):
        self.tp_rank, self.tp_size = get_tp_group().rank, get_tp_group().world_size
        self.output_size = output_size
        super().__init__(input_size, divide(output_size, self.tp_size, what), bias=bias, dtype=dtype)
        self.gather_output = gather_output

    def weight_loader(self, param: nn.Parameter, loaded_weight) -> None:
        copy_shard(param, loaded_weight, 0, self.tp_rank)

    def weight_loaders(self) -> dict[str, WeightSlot]:
        slots = {"weight": ((self.output_size, self.in_features), lambda w: self.weight_loader(self.weight, w))}
        if self.bias is not None:
            slots["bias"] = ((self.output_size,), lambda w: self.weight_loader(self.bias, w))
        return slots

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        return tensor_model_parallel_all_gather(y) if self.gather_output else y


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Column blocks ``output_sizes`` in one checkpoint tensor; rank ``r`` holds block ``i``'s rows
    ``[r * n_i/tp, (r+1) * n_i/tp)`` for every ``i``, blocks in order."""

    def __init__(
        self,
        input_size: int,
        output_sizes: list[int],
        bias: bool = False,
        *,
        dtype: torch.dtype | None = None,
        what: str = "output_sizes",
    ):
        tp = get_tp_group().world_size
        # NOTE: at TP 1 the blocks are the whole weight (one read).
        self.output_sizes = list(output_sizes)
        self.local_sizes = [divide(n, tp, f"{what}[{i}]") for i, n in enumerate(output_sizes)]
        super().__init__(input_size, sum(output_sizes), bias, dtype=dtype, what=what)

    def weight_loader(self, param: nn.Parameter, loaded_weight) -> None:
        if self.tp_size == 1:
            param.data.copy_(read_loaded(loaded_weight))
            return
        param.data.copy_(read_blocks(loaded_weight, self.output_sizes, self.tp_rank, self.tp_size))


class RowParallelLinear(nn.Linear):
    """``[*, input_size / tp] -> [*, output_size]``: the partial products summed over the ranks."""

    def __init__(
        self,
        input_size: int,
        output_size: int,
        bias: bool = False,
        *,
        reduce_results: bool = True,
        dtype: torch.dtype | None = None,
        what: str = "input_size",
    ):
        self.tp_rank, self.tp_size = get_tp_group().rank, get_tp_group().world_size
        self.input_size = input_size
        super().__init__(divide(input_size, self.tp_size, what), output_size, bias=bias, dtype=dtype)
        self.reduce_results = reduce_results

    def weight_loader(self, param: nn.Parameter, loaded_weight) -> None:
        # NOTE: the bias is replicated; only the weight is split (along its inputs).
        copy_shard(param, loaded_weight, 1 if param.dim() == 2 else None, self.tp_rank)

    def weight_loaders(self) -> dict[str, WeightSlot]:
        slots = {"weight": ((self.out_features, self.input_size), lambda w: self.weight_loader(self.weight, w))}
        if self.bias is not None:
            slots["bias"] = ((self.out_features,), lambda w: self.weight_loader(self.bias, w))
        return slots

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.linear(x, self.weight, self.bias)
        y = F.linear(x, self.weight)
        if self.reduce_results:
            y = tensor_model_parallel_all_reduce(y)
        return y if self.bias is None else y + self.bias


__all__ = ["ColumnParallelLinear", "MergedColumnParallelLinear", "RowParallelLinear", "shard_size"]
