"""Tensor parallelism over torch.distributed: process groups, collectives, the per-step broadcast and
the worker processes. Model code only sees :func:`get_tp_group` (through the parallel layers)."""

from deltaserve.distributed.communication_op import (
    tensor_model_parallel_all_gather,
    tensor_model_parallel_all_reduce,
)
from deltaserve.distributed.parallel_state import (
    TPGroup,
    get_tp_group,
    get_tensor_model_parallel_rank,
    get_tensor_model_parallel_world_size,
    init_distributed,
)

__all__ = [
    "TPGroup",
    "get_tp_group",
    "get_tensor_model_parallel_rank",
    "get_tensor_model_parallel_world_size",
    "init_distributed",
    "tensor_model_parallel_all_gather",
    "tensor_model_parallel_all_reduce",
]
