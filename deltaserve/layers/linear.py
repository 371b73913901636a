"""Tensor-parallel linear layers, vLLM's scheme and names.

- :class:`ColumnParallelLinear`: ``Y = X A^T`` with the rows of ``A`` (the outputs) split: each rank
  computes its slice of the outputs (heads, intermediate channels); no communication.
- :class:`MergedColumnParallelLinear`: one weight holding several column blocks side by side (e.g.
  ``[q | k | v]``); each rank takes its slice of every block.
- :class:`RowParallelLinear`: the inputs split; each rank's product is a partial sum, all-reduced
  (``reduce_results``), then the bias is added once.
- :class:`MergedLinear`: several projections of the same input (each a :class:`LinearBlock`: a checkpoint
  tensor of its own, split over the ranks or replicated) in one weight, so one GEMM; each block stays
  visible under its checkpoint name through a :class:`LinearBlockView` beside the merged layer.

Each has ``weight_loader(param, loaded_weight)`` that copies this rank's slice of the checkpoint
tensor (a safetensors slice: only that slice is read) and ``weight_loaders()`` for the model loader.
At TP 1 each is an ``nn.Linear`` with the full weight, and its forward is ``F.linear``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

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


@dataclass(frozen=True)
class LinearBlock:
    """One projection of a :class:`MergedLinear`: ``name`` is its checkpoint name beside the merged layer
    (``"q_proj"`` for ``q_proj.weight``), ``size`` its output width (or the widths of the sub-blocks its
    checkpoint tensor holds side by side, each split like a :class:`MergedColumnParallelLinear` block);
    ``sharded``: split over the TP ranks (column-parallel), else replicated; ``bias``: it has one."""

    name: str
    size: int | tuple[int, ...]
    sharded: bool = True
    bias: bool = False

    @property
    def parts(self) -> tuple[int, ...]:
        return (self.size,) if isinstance(self.size, int) else tuple(self.size)


class MergedLinear(nn.Module):
    """``[*, input_size] -> [*, sum of local widths]``: the blocks' outputs side by side, in block order
    (a sharded block gives this rank's share, a replicated one all of it), from one ``F.linear``.

    The weight (and bias) is named only through :attr:`views`, which the owner sets beside this layer
    under the blocks' checkpoint names: ``state_dict``, ``load_state_dict`` and the model loader see
    ``q_proj.weight``, ... and never the merged tensor. A block without a bias holds zero bias rows.
    """

    def __init__(
        self,
        input_size: int,
        blocks: Sequence[LinearBlock],
        *,
        dtype: torch.dtype | None = None,
        what: str | None = None,
    ):
        super().__init__()
        group = get_tp_group()
        self.tp_rank, self.tp_size = group.rank, group.world_size
        self.blocks = tuple(blocks)
        self.input_size = input_size
        self.local_sizes = [
            sum(divide(n, self.tp_size, what or f"{b.name} output size") if b.sharded else n for n in b.parts)
            for b in self.blocks
        ]
        self.offsets = [sum(self.local_sizes[:i]) for i in range(len(self.blocks))]
        width = sum(self.local_sizes)
        self.weight = nn.Parameter(torch.empty(width, input_size, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(width, dtype=dtype)) if any(b.bias for b in self.blocks) else None
        # NOTE: nn.Linear's initialisation (the loader overwrites every row).
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        # NOTE: a plain list, not submodules: the owner registers the views under the checkpoint names.
        self.views = [LinearBlockView(self, i) for i in range(len(self.blocks))]

    def rows(self, index: int) -> slice:
        return slice(self.offsets[index], self.offsets[index] + self.local_sizes[index])

    def split(self, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The blocks' outputs of ``y = self(x)``, views in block order."""
        return y.split(self.local_sizes, dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def read_block(self, index: int, loaded) -> torch.Tensor:
        """This rank's rows of block ``index``'s checkpoint tensor (weight or bias), reading only those."""
        block = self.blocks[index]
        if not block.sharded or self.tp_size == 1:
            return read_loaded(loaded)
        return read_blocks(loaded, list(block.parts), self.tp_rank, self.tp_size)

    def copy_rows(self, index: int, name: str, rows: torch.Tensor) -> None:
        """Copy this rank's rows of block ``index``'s ``name`` (``"weight"`` / ``"bias"``) into place; a weight
        of a block without a bias also zeroes its bias rows (every block's weight is loaded)."""
        where = self.rows(index)
        getattr(self, name).data[where].copy_(rows)
        if name == "weight" and self.bias is not None and not self.blocks[index].bias:
            self.bias.data[where].zero_()

    def load_block(self, index: int, name: str, loaded) -> None:
        """Load block ``index``'s ``name`` from its checkpoint tensor (this rank's rows only)."""
        self.copy_rows(index, name, self.read_block(index, loaded))

    def checkpoint_weights(self, stored=None) -> dict[str, WeightSlot]:
        # NOTE: no tensor of its own in a checkpoint: the views name and load its rows.
        return {}

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        pass  # NOTE: the views save the rows under the blocks' names

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:  # fmt: skip
        # NOTE: the views load the rows from the blocks' names; nothing is stored under this layer's own.
        if strict:
            unexpected_keys += [key for key in state_dict if key.startswith(prefix)]


class LinearBlockView(nn.Module):
    """Block ``index`` of a :class:`MergedLinear` under its checkpoint name: ``weight`` / ``bias`` are
    views of this rank's rows of the merged tensors; it saves, loads and names them for the loader
    (checkpoint shape: the full block's). Calling it computes the block alone (tests, not the engine)."""

    def __init__(self, merged: MergedLinear, index: int):
        super().__init__()
        # NOTE: not a submodule: the merged layer is registered once, by its owner.
        object.__setattr__(self, "merged", merged)
        self.index = index
        self.block = merged.blocks[index]

    @property
    def weight(self) -> torch.Tensor:
        return self.merged.weight[self.merged.rows(self.index)]

    @property
    def bias(self) -> torch.Tensor | None:
        return self.merged.bias[self.merged.rows(self.index)] if self.block.bias else None

    def _names(self) -> tuple[str, ...]:
        return ("weight", "bias") if self.block.bias else ("weight",)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def checkpoint_weights(self, stored=None) -> dict[str, WeightSlot]:
        full = sum(self.block.parts)
        shapes = {"weight": (full, self.merged.input_size), "bias": (full,)}
        return {
            name: (shapes[name], lambda loaded, name=name: self.merged.load_block(self.index, name, loaded))
            for name in self._names()
        }

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        for name in self._names():
            tensor = getattr(self, name)
            destination[prefix + name] = tensor if keep_vars else tensor.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:  # fmt: skip
        names = self._names()
        for name in names:
            key = prefix + name
            if key not in state_dict:
                missing_keys.append(key)
                continue
            source, target = state_dict[key], getattr(self, name)
            if tuple(source.shape) != tuple(target.shape):
                error_msgs.append(
                    f"size mismatch for {key}: copying a param with shape {tuple(source.shape)} from checkpoint, "
                    f"the shape in current model is {tuple(target.shape)}."
                )
                continue
            # NOTE: a state dict holds this rank's rows (what state_dict() gives on this rank).
            self.merged.copy_rows(self.index, name, source)
        if strict:
            unexpected_keys += [k for k in state_dict if k.startswith(prefix) and k[len(prefix) :] not in names]


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
    "LinearBlock",
    "LinearBlockView",
    "MergedColumnParallelLinear",
    "MergedLinear",
    "RowParallelLinear",
    "kv_heads_per_rank",
    "shard_size",
]
