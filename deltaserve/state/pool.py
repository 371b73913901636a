"""The state pool: one conv tensor and one recurrent tensor per layer-kind group.

Per group, ``conv[group]`` is ``[layers, slots, *conv_shape]`` and ``recurrent[group]`` is
``[layers, slots, *recurrent_shape]``; a layer's state is a view. Slot 0 is the null slot: padded
rows point at it and nothing reads what it holds. A slot is zeroed when it is handed out, so a
freed slot is never read before it is written.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, NamedTuple

import torch

from deltaserve.state.layout import StateLayout

NULL_SLOT = 0


class LayerState(NamedTuple):
    """One layer's states over all slots: conv ``[slots, *conv_shape]``, recurrent ``[slots, *rec]`` or None."""

    conv_state: torch.Tensor
    recurrent_state: torch.Tensor | None


@dataclass(frozen=True)
class StateGroup:
    """Layers of one kind that share a layout, and so one pair of pool tensors."""

    layout: StateLayout
    num_layers: int


class PoolExhausted(RuntimeError):
    """Raised when more slots are asked for than are free."""


class StatePool:
    """Slots of per-request state for every linear layer, allocated and freed by the engine."""

    def __init__(
        self,
        groups: Mapping[str, StateGroup],
        num_slots: int,
        device: torch.device | str = "cpu",
    ):
        if num_slots < 1:
            raise ValueError(f"num_slots must be >= 1, got {num_slots}")
        self.groups = dict(groups)
        self.num_slots = num_slots
        self.device = torch.device(device)
        rows = num_slots + 1  # row 0 is the null slot
        self.conv: dict[str, torch.Tensor] = {}
        self.recurrent: dict[str, torch.Tensor | None] = {}
        for name, group in self.groups.items():
            layout = group.layout
            self.conv[name] = torch.zeros(
                (group.num_layers, rows, *layout.conv_shape), dtype=layout.conv_dtype, device=self.device
            )
            self.recurrent[name] = (
                torch.zeros(
                    (group.num_layers, rows, *layout.recurrent_shape),
                    dtype=layout.recurrent_dtype,
                    device=self.device,
                )
                if layout.has_recurrent
                else None
            )
        self._free: deque[int] = deque(range(1, rows))
        self._used: set[int] = set()
        # NOTE: called with the slots each allocation zeroes; TP rank 0 logs them for the other ranks.
        self.zero_hook: Callable[[list[int]], None] | None = None

    # ---- slots -------------------------------------------------------------------------------

    @property
    def num_free_slots(self) -> int:
        return len(self._free)

    @property
    def num_used_slots(self) -> int:
        return len(self._used)

    def allocate(self, n: int = 1) -> list[int]:
        """Hand out ``n`` zeroed slots."""
        if n > len(self._free):
            raise PoolExhausted(f"state pool has {len(self._free)} free slots of {self.num_slots}, {n} requested")
        slots = [self._free.popleft() for _ in range(n)]
        self._used.update(slots)
        self.zero(slots)
        if self.zero_hook is not None:
            self.zero_hook(slots)
        return slots

    def free(self, slots: Iterable[int]) -> None:
        slots = list(slots)
        if len(set(slots)) != len(slots):
            raise ValueError(f"slots {slots} name a slot more than once (it would be freed twice)")
        for slot in slots:
            if slot == NULL_SLOT or not 0 < slot <= self.num_slots:
                raise ValueError(f"slot {slot} is not a slot of this pool (1..{self.num_slots})")
            if slot not in self._used:
                raise ValueError(f"slot {slot} is freed twice (it is not allocated)")
        for slot in slots:
            self._used.remove(slot)
            self._free.append(slot)

    def zero(self, slots: Iterable[int]) -> None:
        """Zero the given slots in every layer of every group."""
        index = torch.as_tensor(list(slots), dtype=torch.long, device=self.device)
        if index.numel() == 0:
            return
        for name in self.groups:
            self.conv[name].index_fill_(1, index, 0)
            if self.recurrent[name] is not None:
                self.recurrent[name].index_fill_(1, index, 0)

    # ---- views -------------------------------------------------------------------------------

    def layer_state(self, group: str, layer: int) -> LayerState:
        """Views of one layer's states, ``[slots + 1, ...]``, indexed by slot id."""
        recurrent = self.recurrent[group]
        return LayerState(self.conv[group][layer], None if recurrent is None else recurrent[layer])

    def conv_parts(self, group: str, conv_state: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Split a conv state (any leading dims) into its parts by the layout's sizes (e.g. q, k, v).

        NOTE: split by sizes, never ``chunk(3)``: q/k and v widths differ in grouped configs.
        """
        layout = self.groups[group].layout
        axis = conv_state.dim() - 2 + layout.conv_channel_axis
        return torch.split(conv_state, list(layout.conv_split), dim=axis)

    @property
    def bytes_total(self) -> int:
        total = sum(t.numel() * t.element_size() for t in self.conv.values())
        total += sum(t.numel() * t.element_size() for t in self.recurrent.values() if t is not None)
        return total
