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


def _weight_and_bias_slots(layer: nn.Linear, weight_shape: tuple[int, int]) -> dict[str, WeightSlot]:
    """``weight`` (checkpoint shape ``weight_shape``) and, if any, ``bias`` (``weight_shape[0]``), each
    through ``layer.weight_loader``."""
    slots = {"weight": (weight_shape, lambda w: layer.weight_loader(layer.weight, w))}
    if layer.bias is not None:
        slots["bias"] = ((weight_shape[0],), lambda w: layer.weight_loader(layer.bias, w))
    return slots


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
        return _weight_and_bias_slots(self, (self.output_size, self.in_features))

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


def kv_heads_per_rank(num_kv_heads: int, tp_size: int) -> tuple[int, int]:
    """``(KV heads a rank holds, ranks that hold each head)``: split when ``tp_size <= num_kv_heads``, else
    each head replicated on ``tp_size / num_kv_heads`` ranks (vLLM's rule); ValueError naming both otherwise."""
    if tp_size <= num_kv_heads:
        return divide(num_kv_heads, tp_size, "num_key_value_heads"), 1
    if tp_size % num_kv_heads != 0:
        raise ValueError(
            f"tp_size = {tp_size} is neither a divisor nor a multiple of num_key_value_heads = {num_kv_heads}"
        )
    return 1, tp_size // num_kv_heads


class KVParallelLinear(ColumnParallelLinear):
    """A K or V projection ``[*, hidden] -> [*, local_heads * head_dim]`` split by KV heads, each head
    replicated on several ranks when TP exceeds their number (rank ``r`` holds head ``r // replicas``)."""

    def __init__(
        self, input_size: int, num_kv_heads: int, head_dim: int, bias: bool = False, *, dtype: torch.dtype | None = None
    ):
        group = get_tp_group()
        self.num_local_heads, self.num_replicas = kv_heads_per_rank(num_kv_heads, group.world_size)
        # NOTE: nn.Linear's init, not the base class's: that one divides the full width by TP, which
        # does not hold once heads are replicated.
        local = self.num_local_heads * head_dim
        nn.Linear.__init__(self, input_size, local, bias=bias, dtype=dtype)
        self.tp_rank, self.tp_size = group.rank, group.world_size
        self.output_size = num_kv_heads * head_dim
        self.gather_output = False

    def weight_loader(self, param: nn.Parameter, loaded_weight) -> None:
        shard = self.tp_rank // self.num_replicas
        local = param.shape[0]
        param.data.copy_(read_loaded(loaded_weight, 0, shard * local, local))


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
        return _weight_and_bias_slots(self, (self.out_features, self.input_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.linear(x, self.weight, self.bias)
        y = F.linear(x, self.weight)
        if self.reduce_results:
            y = tensor_model_parallel_all_reduce(y)
        return y if self.bias is None else y + self.bias


__all__ = [
    "ColumnParallelLinear",
    "KVParallelLinear",
    "MergedColumnParallelLinear",
    "RowParallelLinear",
    "kv_heads_per_rank",
    "shard_size",
]
