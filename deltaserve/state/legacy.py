"""Old four-state KDA snapshots ``(conv_q, conv_k, conv_v, recurrent)`` <-> the two-state layout.

Before vLLM unified them, KDA kept one conv state per sub-projection. The two-state conv state is
their concatenation along channels, ``[q | k | v]``; the reverse split uses the layout's
``conv_split`` sizes (never ``chunk(3)``, which is wrong whenever q/k and v widths differ).
Either conv orientation (``layout.conv_layout``): SD parts are ``(..., state_len, width)``, DS parts
``(..., width, state_len)``; ``...`` is any leading batch/layer dims, the same for all four.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch

from deltaserve.state.layout import StateLayout


class FourState(NamedTuple):
    conv_q: torch.Tensor
    conv_k: torch.Tensor
    conv_v: torch.Tensor
    recurrent: torch.Tensor


class TwoState(NamedTuple):
    conv_state: torch.Tensor
    recurrent_state: torch.Tensor


def _check_layout(layout: StateLayout) -> None:
    if len(layout.conv_split) != 3 or not layout.has_recurrent:
        raise ValueError(
            f"four-state snapshots exist for layouts with a 3-part conv state and a recurrent state "
            f"(KDA); the {layout.kind!r} layout has conv parts {layout.conv_split_names} and "
            f"recurrent shape {layout.recurrent_shape}"
        )


def _conv_part_shape(layout: StateLayout, width: int) -> tuple[int, int]:
    if layout.conv_layout == "SD":
        return (layout.conv_state_len, width)
    return (width, layout.conv_state_len)


def _check_tail(tensor: torch.Tensor, expected: tuple[int, ...], name: str, layout: StateLayout) -> tuple[int, ...]:
    """Check the trailing dims of ``tensor`` against ``expected``; return its leading dims."""
    tail = tuple(tensor.shape[tensor.dim() - len(expected) :]) if tensor.dim() >= len(expected) else None
    if tail != expected:
        raise ValueError(
            f"{name} has shape {tuple(tensor.shape)}; expected (..., {', '.join(map(str, expected))}) for the "
            f"{layout.kind} layout (conv_layout {layout.conv_layout}, conv_split {layout.conv_split}, "
            f"conv_state_len {layout.conv_state_len}, recurrent {layout.recurrent_shape}, tp_size {layout.tp_size})"
        )
    return tuple(tensor.shape[: tensor.dim() - len(expected)])


def four_to_two(states: Sequence[torch.Tensor], layout: StateLayout) -> TwoState:
    """``(conv_q, conv_k, conv_v, recurrent)`` -> ``(conv_state, recurrent_state)``.

    The conv state is a new tensor ``[q | k | v]`` along the channel axis; the recurrent state is
    returned as given. Dtypes are kept (the three conv parts must share one).
    """
    _check_layout(layout)
    if len(states) != 4:
        raise ValueError(f"a four-state snapshot has 4 tensors (conv_q, conv_k, conv_v, recurrent), got {len(states)}")
    conv_q, conv_k, conv_v, recurrent = states
    leading = set()
    for tensor, width, name in zip((conv_q, conv_k, conv_v), layout.conv_split, ("conv_q", "conv_k", "conv_v")):
        leading.add(_check_tail(tensor, _conv_part_shape(layout, width), name, layout))
    leading.add(_check_tail(recurrent, tuple(layout.recurrent_shape), "recurrent", layout))
    if len(leading) != 1:
        raise ValueError(
            "conv_q, conv_k, conv_v and recurrent must share their leading dims, got shapes "
            f"{[tuple(t.shape) for t in states]}"
        )
    dtypes = {conv_q.dtype, conv_k.dtype, conv_v.dtype}
    if len(dtypes) != 1:
        found = f"{conv_q.dtype}, {conv_k.dtype}, {conv_v.dtype}"
        raise ValueError(f"conv_q, conv_k, conv_v must share one dtype, got {found}")
    channel_axis = layout.conv_channel_axis - 2  # counted from the end: SD -1, DS -2
    return TwoState(torch.cat((conv_q, conv_k, conv_v), dim=channel_axis), recurrent)


def two_to_four(states: Sequence[torch.Tensor], layout: StateLayout) -> FourState:
    """``(conv_state, recurrent_state)`` -> ``(conv_q, conv_k, conv_v, recurrent)``.

    The conv parts are views of ``conv_state`` split by ``layout.conv_split`` (call ``.clone()`` to
    detach them); the recurrent state is returned as given.
    """
    _check_layout(layout)
    if len(states) != 2:
        raise ValueError(f"a two-state snapshot has 2 tensors (conv_state, recurrent_state), got {len(states)}")
    conv, recurrent = states
    conv_leading = _check_tail(conv, layout.conv_shape, "conv_state", layout)
    recurrent_leading = _check_tail(recurrent, tuple(layout.recurrent_shape), "recurrent_state", layout)
    if conv_leading != recurrent_leading:
        raise ValueError(
            f"conv_state {tuple(conv.shape)} and recurrent_state {tuple(recurrent.shape)} must share their leading dims"
        )
    channel_axis = layout.conv_channel_axis - 2  # counted from the end: SD -1, DS -2
    conv_q, conv_k, conv_v = torch.split(conv, list(layout.conv_split), dim=channel_axis)
    return FourState(conv_q, conv_k, conv_v, recurrent)
