"""Process groups of one tensor-parallel job: the world is the TP group (one model replica).

Each process holds one :class:`TPGroup`: its rank, the TP size, a *device group* for the model's
collectives (NCCL on CUDA, gloo on the CPU) and a gloo *cpu group* for host messages (the per-step
broadcast, results of calls), as in vLLM. Before :func:`init_distributed` (and at TP 1) the group is
rank 0 of 1 and every collective is the identity.

NOTE: one group per process, as torch.distributed's default group is: layers read it when they are
built (to size their shards) and when they run (to reduce), so the model code stays free of it.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist

# NOTE: a collective waits at most this long for a peer (gloo raises then; NCCL's watchdog aborts).
# A dead worker is normally seen sooner, by the engine's worker watchdog or a closed connection.
DEFAULT_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class TPGroup:
    """This process's place in the TP group; ``device_group`` / ``cpu_group`` are None at TP 1."""

    rank: int = 0
    world_size: int = 1
    device_group: dist.ProcessGroup | None = None
    cpu_group: dist.ProcessGroup | None = None
    backend: str = "none"


_TP_GROUP = TPGroup()


def get_tp_group() -> TPGroup:
    return _TP_GROUP


def get_tensor_model_parallel_rank() -> int:
    return _TP_GROUP.rank


def get_tensor_model_parallel_world_size() -> int:
    return _TP_GROUP.world_size


def backend_for(device: torch.device | str) -> str:
    """``nccl`` for CUDA devices, ``gloo`` otherwise."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def init_distributed(
    rank: int,
    world_size: int,
    *,
    device: torch.device | str = "cpu",
    init_method: str | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> TPGroup:
    """Join the job (``init_method`` None: torchrun's ``env://``) and make the TP group this process's.

    On CUDA the process uses ``cuda:<LOCAL_RANK or rank>`` unless ``device`` names an index.
    """
    global _TP_GROUP
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}) (world_size), got {rank}")
    if _TP_GROUP.world_size > 1 or dist.is_initialized():
        raise RuntimeError(
            "this process is already in a tensor-parallel group: shut the other engine down first "
            "(LLMEngine.shutdown())"
        )
    device = torch.device(device)
    backend = backend_for(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else int(os.environ.get("LOCAL_RANK", rank))
        torch.cuda.set_device(index)
    timeout = datetime.timedelta(seconds=timeout_s)
    dist.init_process_group(
        backend, init_method=init_method or "env://", rank=rank, world_size=world_size, timeout=timeout
    )
    cpu_group = dist.new_group(backend="gloo", timeout=timeout) if backend != "gloo" else dist.group.WORLD
    _TP_GROUP = TPGroup(rank, world_size, dist.group.WORLD, cpu_group, backend)
    return _TP_GROUP


def destroy_distributed() -> None:
    """Leave the job (no-op at TP 1); the group is rank 0 of 1 again."""
    global _TP_GROUP
    if dist.is_initialized():
        dist.destroy_process_group()
    _TP_GROUP = TPGroup()


def abort_distributed() -> None:
    """Abort the communicators so that collectives blocked on a dead peer return with an error."""
    group = _TP_GROUP
    for pg in {id(g): g for g in (group.device_group, group.cpu_group) if g is not None}.values():
        with contextlib.suppress(Exception):
            pg.abort()


def reset_tp_group() -> None:
    """Forget the group after a failure (its communicators aborted); a new one may be made."""
    global _TP_GROUP
    with contextlib.suppress(Exception):
        if dist.is_initialized():
            dist.destroy_process_group()
    _TP_GROUP = TPGroup()


@contextlib.contextmanager
def tp_layout(rank: int, world_size: int) -> Iterator[TPGroup]:
    """Build modules as rank ``rank`` of ``world_size`` without processes (shapes only: no collective
    may run): per-rank shards and layouts of large models on the meta device, and a TP-1 engine in a
    process that is also in a TP group (its layers then never communicate)."""
    global _TP_GROUP
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}) (world_size), got {rank}")
    saved, _TP_GROUP = _TP_GROUP, TPGroup(rank, world_size, backend="layout-only")
    try:
        yield _TP_GROUP
    finally:
        _TP_GROUP = saved
