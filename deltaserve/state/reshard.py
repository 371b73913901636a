"""Per-rank state slices from one TP size to another, by the layout's channel split and head ranges.

A rank's conv state is ``[q_local | k_local | v_local]`` (each part a contiguous range of the
part's channels, rank ``r`` of ``tp`` holding range ``r``), its recurrent state the heads
``r * H/tp ..``; a per-head K/V cache block holds the KV heads of its range. Resharding gathers each
part over the source ranks that overlap the destination rank's range and cuts that range out; the
conv orientation (SD / DS) of either side is a transpose. Nothing here depends on how the bytes
travelled.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

from deltaserve.state.layout import StateLayout


def source_ranks(src_tp: int, dst_tp: int, dst_rank: int) -> list[int]:
    """The source ranks whose head ranges overlap destination rank ``dst_rank`` (contiguous ranges)."""
    if not 0 <= dst_rank < dst_tp:
        raise ValueError(f"dst_rank must be in [0, {dst_tp}), got {dst_rank}")
    if src_tp % dst_tp and dst_tp % src_tp:
        raise ValueError(f"TP sizes {src_tp} and {dst_tp}: one must divide the other to reshard by head ranges")
    if src_tp >= dst_tp:
        per = src_tp // dst_tp
        return list(range(dst_rank * per, (dst_rank + 1) * per))
    return [dst_rank * src_tp // dst_tp]


def to_orientation(conv: torch.Tensor, src: str, dst: str) -> torch.Tensor:
    """A conv state (any leading dims) from orientation ``src`` to ``dst`` (SD = ``[state_len, dim]``)."""
    return conv if src == dst else conv.transpose(-1, -2)


def _narrow_parts(parts: list[torch.Tensor], global_split: Sequence[int], offset_tp: int, first: int,
                  dst_widths: Sequence[int], dst_rank: int, dst_tp: int, axis: int) -> torch.Tensor:
    """Cut destination rank ``dst_rank``'s range of every part out of the parts gathered from
    ``offset_tp`` consecutive source ranks starting at ``first`` (their ranges laid end to end)."""
    out = []
    for part, total, width in zip(parts, global_split, dst_widths):
        gathered_start = first * total // offset_tp
        start = dst_rank * width - gathered_start
        out.append(part.narrow(axis, start, width))
    return torch.cat(out, dim=axis)


def reshard_conv(
    slices: Mapping[int, torch.Tensor], src: StateLayout, dst: StateLayout, dst_rank: int
) -> torch.Tensor:
    """Destination rank ``dst_rank``'s conv state from the source ranks' slices (``{rank: tensor}``,
    any leading dims, each in ``src``'s orientation); returned in ``dst``'s orientation."""
    ranks = source_ranks(src.tp_size, dst.tp_size, dst_rank)
    missing = [r for r in ranks if r not in slices]
    if missing:
        raise ValueError(f"reshard_conv: source ranks {missing} are needed for destination rank {dst_rank}")
    global_split = [w * src.tp_size for w in src.conv_split]
    if global_split != [w * dst.tp_size for w in dst.conv_split]:
        raise ValueError(f"conv_split {src.conv_split} x tp {src.tp_size} != {dst.conv_split} x tp {dst.tp_size}")
    # NOTE: work in SD ([..., state_len, dim]): channels on the last axis.
    per_rank = [torch.split(to_orientation(slices[r], src.conv_layout, "SD"), list(src.conv_split), dim=-1)
                for r in ranks]
    parts = [torch.cat([p[i] for p in per_rank], dim=-1) for i in range(len(global_split))]
    out = _narrow_parts(parts, global_split, src.tp_size, ranks[0], dst.conv_split, dst_rank, dst.tp_size, -1)
    return to_orientation(out, "SD", dst.conv_layout)


def reshard_heads(
    slices: Mapping[int, torch.Tensor], src_tp: int, dst_tp: int, dst_rank: int, head_axis: int
) -> torch.Tensor:
    """A tensor sharded by heads along ``head_axis`` (a recurrent state, a per-head K/V block)."""
    ranks = source_ranks(src_tp, dst_tp, dst_rank)
    missing = [r for r in ranks if r not in slices]
    if missing:
        raise ValueError(f"reshard_heads: source ranks {missing} are needed for destination rank {dst_rank}")
    gathered = torch.cat([slices[r] for r in ranks], dim=head_axis)
    heads_per_src = slices[ranks[0]].shape[head_axis]
    total = heads_per_src * src_tp
    if total % dst_tp:
        raise ValueError(f"{total} heads are not divisible by the destination tp_size {dst_tp}")
    width = total // dst_tp
    start = dst_rank * width - ranks[0] * heads_per_src
    return gathered.narrow(head_axis, start, width)


def reshard_recurrent(
    slices: Mapping[int, torch.Tensor], src: StateLayout, dst: StateLayout, dst_rank: int
) -> torch.Tensor:
    """Destination rank's recurrent state ``[..., H/tp_dst, Dv, Dk]`` from ``{rank: [..., H/tp_src, Dv, Dk]}``."""
    if src.recurrent_shape is None:
        raise ValueError(f"layout kind {src.kind!r} has no recurrent state")
    return reshard_heads(slices, src.tp_size, dst.tp_size, dst_rank, head_axis=-3)
