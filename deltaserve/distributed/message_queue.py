"""Host messages from TP rank 0 to the other ranks over the gloo cpu group: one broadcast each.

A message is pickled into a fixed-capacity byte buffer (an 8-byte length header, then the
payload) and sent with a single ``broadcast``. A message larger than the buffer is preceded by one
that only grows every rank's buffer (doubling until it fits), so the common step costs one
collective and the buffer settles at the largest step seen.
"""

from __future__ import annotations

import pickle
import struct
from typing import Any

import torch
import torch.distributed as dist

from deltaserve.distributed.parallel_state import get_tp_group

HEADER = struct.Struct("<q")  # payload length; < 0: "grow to -length bytes, the message follows"
INITIAL_CAPACITY = 1 << 16


class BroadcastChannel:
    """``send(obj)`` on rank 0, ``recv()`` on every other rank, in the same order."""

    def __init__(self, capacity: int = INITIAL_CAPACITY):
        self.group = get_tp_group()
        self.buffer = torch.zeros(capacity, dtype=torch.uint8)

    def _broadcast(self) -> None:
        dist.broadcast(self.buffer, src=0, group=self.group.cpu_group)

    def send(self, obj: Any) -> None:
        payload = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        need = HEADER.size + len(payload)
        if need > self.buffer.numel():
            capacity = self.buffer.numel()
            while capacity < need:
                capacity *= 2
            self.buffer[: HEADER.size] = torch.frombuffer(bytearray(HEADER.pack(-capacity)), dtype=torch.uint8)
            self._broadcast()
            self.buffer = torch.zeros(capacity, dtype=torch.uint8)
        self.buffer[: HEADER.size] = torch.frombuffer(bytearray(HEADER.pack(len(payload))), dtype=torch.uint8)
        if payload:
            self.buffer[HEADER.size : need] = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
        self._broadcast()

    def recv(self) -> Any:
        while True:
            self._broadcast()
            (length,) = HEADER.unpack(self.buffer[: HEADER.size].numpy().tobytes())
            if length >= 0:
                return pickle.loads(self.buffer[HEADER.size : HEADER.size + length].numpy().tobytes())
            self.buffer = torch.zeros(-length, dtype=torch.uint8)


def min_over_ranks(value: int) -> int:
    """The smallest ``value`` of all TP ranks (every rank calls it)."""
    group = get_tp_group()
    if group.world_size == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(tensor, op=dist.ReduceOp.MIN, group=group.cpu_group)
    return int(tensor.item())


def gather_to_first(obj: Any) -> list[Any] | None:
    """Every rank's ``obj`` on rank 0 (in rank order), None on the others (every rank calls it)."""
    group = get_tp_group()
    if group.world_size == 1:
        return [obj]
    out = [None] * group.world_size if group.rank == 0 else None
    dist.gather_object(obj, out, dst=0, group=group.cpu_group)
    return out
