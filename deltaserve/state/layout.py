"""The two-state layout: shapes, dtypes and channel split of a linear layer's per-request state.

Every linear-attention layer kind keeps one conv state (the short-convolution input windows of all
its sub-projections, concatenated along channels) and, except short conv, one recurrent state.
Shapes are per slot and per tensor-parallel rank.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

CONV_LAYOUTS = ("SD", "DS")


def divide(size: int, tp_size: int, what: str) -> int:
    """``size / tp_size``, exact, or a ValueError that names the size and the TP degree."""
    if tp_size < 1:
        raise ValueError(f"tp_size must be >= 1, got {tp_size}")
    if size % tp_size != 0:
        raise ValueError(f"{what} = {size} is not divisible by tp_size = {tp_size}")
    return size // tp_size


def resolve_dtype(name: str | torch.dtype, default: torch.dtype, what: str = "dtype") -> torch.dtype:
    """``"auto"`` -> ``default``; a torch dtype or a dtype name such as ``"bfloat16"`` -> that dtype."""
    if isinstance(name, torch.dtype):
        return name
    if name == "auto":
        return default
    aliases = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}
    dtype = getattr(torch, aliases.get(name, name), None) if isinstance(name, str) else None
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"{what} must be 'auto' or a floating dtype name such as 'bfloat16', got {name!r}")
    return dtype


@dataclass(frozen=True)
class StateLayout:
    """Per-slot state of one linear layer on one TP rank.

    ``conv_split`` gives the channel widths of the conv state's parts in order (for KDA and GDN:
    q, k, v); ``recurrent_shape`` is None for layer kinds without a recurrent state.
    """

    kind: str
    conv_split: tuple[int, ...]
    conv_split_names: tuple[str, ...]
    conv_dtype: torch.dtype
    recurrent_shape: tuple[int, ...] | None
    recurrent_dtype: torch.dtype | None
    conv_layout: str = "SD"
    conv_kernel_size: int = 4
    num_spec: int = 0
    tp_size: int = 1

    def __post_init__(self):
        if self.conv_layout not in CONV_LAYOUTS:
            raise ValueError(f"conv_layout must be one of {CONV_LAYOUTS}, got {self.conv_layout!r}")

    @property
    def conv_dim(self) -> int:
        """Channels of the conv state: the parts side by side."""
        return sum(self.conv_split)

    @property
    def conv_state_len(self) -> int:
        """Inputs kept per channel: the kernel's window plus one per speculative token."""
        return self.conv_kernel_size - 1 + self.num_spec

    @property
    def conv_shape(self) -> tuple[int, int]:
        if self.conv_layout == "SD":
            return (self.conv_state_len, self.conv_dim)
        return (self.conv_dim, self.conv_state_len)

    @property
    def conv_channel_axis(self) -> int:
        """Axis of the channels within one slot's conv state (0 for DS, 1 for SD)."""
        return 1 if self.conv_layout == "SD" else 0

    @property
    def has_recurrent(self) -> bool:
        return self.recurrent_shape is not None

    @property
    def shapes(self) -> tuple[tuple[int, ...], ...]:
        if self.recurrent_shape is None:
            return (self.conv_shape,)
        return (self.conv_shape, self.recurrent_shape)

    @property
    def dtypes(self) -> tuple[torch.dtype, ...]:
        if self.recurrent_dtype is None:
            return (self.conv_dtype,)
        return (self.conv_dtype, self.recurrent_dtype)

    @property
    def conv_bytes(self) -> int:
        return self.conv_dim * self.conv_state_len * self.conv_dtype.itemsize

    @property
    def recurrent_bytes(self) -> int:
        if self.recurrent_shape is None:
            return 0
        return math.prod(self.recurrent_shape) * self.recurrent_dtype.itemsize

    @property
    def bytes_per_slot(self) -> int:
        return self.conv_bytes + self.recurrent_bytes


def _check_common(conv_kernel_size: int, num_spec: int) -> None:
    if conv_kernel_size < 1:
        raise ValueError(f"conv_kernel_size must be >= 1, got {conv_kernel_size}")
    if num_spec < 0:
        raise ValueError(f"num_spec must be >= 0, got {num_spec}")


def kda_layout(
    num_heads: int,
    head_dim: int,
    *,
    num_k_heads: int | None = None,
    head_k_dim: int | None = None,
    conv_kernel_size: int = 4,
    tp_size: int = 1,
    num_spec: int = 0,
    conv_layout: str = "SD",
    model_dtype: torch.dtype = torch.bfloat16,
    cache_dtype: str | torch.dtype = "auto",
) -> StateLayout:
    """Kimi Delta Attention: conv ``[q | k | v]``, recurrent ``(H/tp, Dv, Dk)`` in float32."""
    _check_common(conv_kernel_size, num_spec)
    num_k_heads = num_heads if num_k_heads is None else num_k_heads
    head_k_dim = head_dim if head_k_dim is None else head_k_dim
    q = divide(num_k_heads * head_k_dim, tp_size, "KDA q width (num_k_heads * head_k_dim)")
    v = divide(num_heads * head_dim, tp_size, "KDA v width (num_heads * head_dim)")
    heads = divide(num_heads, tp_size, "KDA num_heads")
    return StateLayout(
        kind="kda",
        conv_split=(q, q, v),
        conv_split_names=("q", "k", "v"),
        conv_dtype=resolve_dtype(cache_dtype, model_dtype, "cache_dtype"),
        recurrent_shape=(heads, head_dim, head_k_dim),
        recurrent_dtype=torch.float32,
        conv_layout=conv_layout,
        conv_kernel_size=conv_kernel_size,
        num_spec=num_spec,
        tp_size=tp_size,
    )


def gdn_layout(
    num_k_heads: int,
    num_v_heads: int,
    head_k_dim: int,
    head_v_dim: int,
    *,
    conv_kernel_size: int = 4,
    tp_size: int = 1,
    num_spec: int = 0,
    conv_layout: str = "SD",
    model_dtype: torch.dtype = torch.bfloat16,
    cache_dtype: str | torch.dtype = "auto",
    ssm_dtype: str | torch.dtype = "auto",
) -> StateLayout:
    """Gated DeltaNet: conv ``[q | k | v]``, recurrent ``(Hv/tp, Dv, Dk)``; ssm dtype defaults to the cache dtype."""
    _check_common(conv_kernel_size, num_spec)
    q = divide(num_k_heads * head_k_dim, tp_size, "GDN q width (num_k_heads * head_k_dim)")
    v = divide(num_v_heads * head_v_dim, tp_size, "GDN v width (num_v_heads * head_v_dim)")
    heads = divide(num_v_heads, tp_size, "GDN num_v_heads")
    conv_dtype = resolve_dtype(cache_dtype, model_dtype, "cache_dtype")
    return StateLayout(
        kind="gdn",
        conv_split=(q, q, v),
        conv_split_names=("q", "k", "v"),
        conv_dtype=conv_dtype,
        recurrent_shape=(heads, head_v_dim, head_k_dim),
        recurrent_dtype=resolve_dtype(ssm_dtype, conv_dtype, "ssm_dtype"),
        conv_layout=conv_layout,
        conv_kernel_size=conv_kernel_size,
        num_spec=num_spec,
        tp_size=tp_size,
    )


def extra_groups_for_head_shards(n_groups: int, tp_size: int) -> int:
    """Groups to add so that every rank holds the group of each of its heads (Mamba2)."""
    if n_groups % tp_size == 0:
        return 0
    if n_groups != 1:
        raise ValueError(f"Mamba2 n_groups = {n_groups} is neither 1 nor divisible by tp_size = {tp_size}")
    # A single group is replicated on every rank.
    return tp_size - n_groups


def mamba2_layout(
    intermediate_size: int,
    n_groups: int,
    num_heads: int,
    head_dim: int,
    state_size: int,
    conv_kernel_size: int,
    *,
    tp_size: int = 1,
    num_spec: int = 0,
    conv_layout: str = "SD",
    model_dtype: torch.dtype = torch.bfloat16,
    cache_dtype: str | torch.dtype = "auto",
    ssm_dtype: str | torch.dtype = "auto",
) -> StateLayout:
    """Mamba2: conv ``[x | B | C]`` with groups extended for TP, recurrent ``(nheads/tp, head_dim, N)``."""
    _check_common(conv_kernel_size, num_spec)
    groups = n_groups + extra_groups_for_head_shards(n_groups, tp_size)
    x = divide(intermediate_size, tp_size, "Mamba2 intermediate_size")
    bc = divide(groups * state_size, tp_size, "Mamba2 B/C width (n_groups * state_size)")
    heads = divide(num_heads, tp_size, "Mamba2 num_heads")
    conv_dtype = resolve_dtype(cache_dtype, model_dtype, "cache_dtype")
    return StateLayout(
        kind="mamba2",
        conv_split=(x, bc, bc),
        conv_split_names=("x", "B", "C"),
        conv_dtype=conv_dtype,
        recurrent_shape=(heads, head_dim, state_size),
        recurrent_dtype=resolve_dtype(ssm_dtype, conv_dtype, "ssm_dtype"),
        conv_layout=conv_layout,
        conv_kernel_size=conv_kernel_size,
        num_spec=num_spec,
        tp_size=tp_size,
    )


def short_conv_layout(
    intermediate_size: int,
    conv_kernel_size: int,
    *,
    tp_size: int = 1,
    conv_layout: str = "SD",
    model_dtype: torch.dtype = torch.bfloat16,
    cache_dtype: str | torch.dtype = "auto",
) -> StateLayout:
    """Short convolution: a conv state only."""
    _check_common(conv_kernel_size, 0)
    x = divide(intermediate_size, tp_size, "short conv intermediate_size")
    return StateLayout(
        kind="short_conv",
        conv_split=(x,),
        conv_split_names=("x",),
        conv_dtype=resolve_dtype(cache_dtype, model_dtype, "cache_dtype"),
        recurrent_shape=None,
        recurrent_dtype=None,
        conv_layout=conv_layout,
        conv_kernel_size=conv_kernel_size,
        num_spec=0,
        tp_size=tp_size,
    )
