"""Gated DeltaNet layer (Qwen3-Next, Qwen3.5): projections, short conv, the delta rule on the slot pool with a
per-head gate and GVA, SiLU-gated RMSNorm, output projection.

Parameter names are those of the checkpoints under ``linear_attn.``. Two projection layouts:

- ``"qkvz"`` (Qwen3-Next): ``in_proj_qkvz`` and ``in_proj_ba``, rows interleaved per key head: for each
  of the ``Hk`` groups ``[q Dk | k Dk | v G*Dv | z G*Dv]`` and ``[b G | a G]`` (``G = Hv / Hk``);
- ``"split"`` (Qwen3.5): ``in_proj_qkv`` = ``[q all | k all | v all]``, ``in_proj_z``, ``in_proj_b``, ``in_proj_a``.

Either way the conv runs over ``[q | k | v]`` (sizes ``Hk*Dk, Hk*Dk, Hv*Dv``), the pool's conv layout, and
the projections are one GEMM (``in_proj``, the checkpoint tensors' rows side by side, named by its views).
"""

from __future__ import annotations

import torch
from torch import nn

from deltaserve.distributed.parallel_state import get_tp_group
from deltaserve.distributed.sharding import WeightSlot, blocks_slot, sharded_slot
from deltaserve.layers.delta_rule import DeltaRuleMixer
from deltaserve.layers.linear import LinearBlock, MergedLinear, RowParallelLinear
from deltaserve.state.layout import divide
from deltaserve.layers.norm import GatedRMSNorm
from deltaserve.ops.delta_rule import gdn_gate

PROJECTIONS = ("qkvz", "split")


def _grouped_index(groups: int, parts: list[int], picks: list[int]) -> torch.Tensor:
    """Columns of a per-group interleaved projection ``[g0: p0 | p1 | ...][g1: ...]`` that hold parts
    ``picks``, in the order ``part-major, then group`` (e.g. all q, then all k, then all v)."""
    width = sum(parts)
    starts = [sum(parts[:i]) for i in range(len(parts))]
    index = [g * width + starts[p] + c for p in picks for g in range(groups) for c in range(parts[p])]
    # NOTE: on the CPU even inside a meta-device context (models are built on meta and loaded later).
    return torch.tensor(index, dtype=torch.long, device="cpu")


class GatedDeltaNet(DeltaRuleMixer):
    """GDN token mixer of one layer; ``forward(positions, hidden_states [T, hidden]) -> [T, hidden]``.

    Under TP each rank holds ``Hk / tp`` key-head groups with their ``Hv / tp`` value heads: a
    contiguous share of the per-group interleaved ``qkvz`` / ``ba`` rows, a share of each of the
    ``[q | k | v]`` blocks of ``in_proj_qkv`` and the conv weight; ``out_proj`` all-reduces.
    """

    def __init__(
        self,
        hidden_size: int,
        num_k_heads: int,
        num_v_heads: int,
        head_k_dim: int,
        head_v_dim: int,
        *,
        conv_kernel_size: int = 4,
        rms_norm_eps: float = 1e-6,
        projection: str = "qkvz",
        conv_activation: str = "silu",
        layer_idx: int = 0,
        dtype: torch.dtype = torch.float32,
    ):
        if projection not in PROJECTIONS:
            raise ValueError(f"GatedDeltaNet: projection must be one of {PROJECTIONS}, got {projection!r}")
        if num_k_heads < 1 or num_v_heads % num_k_heads != 0:
            raise ValueError(
                f"GatedDeltaNet: linear_num_value_heads = {num_v_heads} must be a multiple of "
                f"linear_num_key_heads = {num_k_heads}"
            )
        tp_rank, tp_size = get_tp_group().rank, get_tp_group().world_size
        full_key_dim, full_value_dim = num_k_heads * head_k_dim, num_v_heads * head_v_dim
        # NOTE: this rank's groups; value heads follow their key head (Hv is a multiple of Hk).
        num_k_heads = divide(num_k_heads, tp_size, "GDN linear_num_key_heads")
        num_v_heads = divide(num_v_heads, tp_size, "GDN linear_num_value_heads")
        key_dim, value_dim = num_k_heads * head_k_dim, num_v_heads * head_v_dim
        # NOTE: float32 (the engine's default for GDN) or bfloat16 (opt-in) recurrent states; the kernels take both.
        super().__init__("gdn", (key_dim, key_dim, value_dim), (num_v_heads, head_v_dim, head_k_dim),
                         conv_kernel_size, layer_idx, conv_activation, (torch.float32, torch.bfloat16))  # fmt: skip
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self.conv_blocks = [full_key_dim, full_key_dim, full_value_dim]
        self.hidden_size = hidden_size
        self.num_k_heads, self.num_v_heads = num_k_heads, num_v_heads
        self.head_k_dim, self.head_v_dim = head_k_dim, head_v_dim
        self.projection = projection
        conv_dim = 2 * key_dim + value_dim

        # NOTE: [q | k | v | z | b | a] widths of this rank's projection outputs, once put in that order.
        self.output_split = [conv_dim, value_dim, num_v_heads, num_v_heads]
        if projection == "qkvz":
            # NOTE: rows interleaved per key-head group: a contiguous split hands out whole groups.
            blocks = [LinearBlock("in_proj_qkvz", full_key_dim * 2 + full_value_dim * 2),
                      LinearBlock("in_proj_ba", 2 * num_v_heads * tp_size)]  # fmt: skip
            group = num_v_heads // num_k_heads
            parts = [head_k_dim, head_k_dim, group * head_v_dim, group * head_v_dim]
            # NOTE: one gather of the merged output's columns into [q | k | v | z | b | a] (the ba columns
            # follow this rank's qkvz ones), instead of splits of strided views and copies. A plain
            # attribute copied to each device on first use, not a buffer: a model built on the meta device
            # and given storage with to_empty() (as the loader does) would leave buffers uninitialised.
            self._gather_index = torch.cat([
                _grouped_index(num_k_heads, parts, [0, 1, 2, 3]),
                conv_dim + value_dim + _grouped_index(num_k_heads, [group, group], [0, 1]),
            ])  # fmt: skip
            self._device_index: dict[torch.device, torch.Tensor] = {}
        else:
            blocks = [LinearBlock("in_proj_qkv", tuple(self.conv_blocks)), LinearBlock("in_proj_z", full_value_dim)]
            blocks += [LinearBlock(name, num_v_heads * tp_size) for name in ("in_proj_b", "in_proj_a")]
        self.in_proj = MergedLinear(hidden_size, blocks, dtype=dtype)
        for block, view in zip(blocks, self.in_proj.views):
            setattr(self, block.name, view)
        # NOTE: holds the depthwise weight [conv_dim, 1, K] over [q | k | v] under the checkpoint's name; never called.
        self.conv1d = nn.Conv1d(conv_dim, conv_dim, conv_kernel_size, groups=conv_dim, bias=False, dtype=dtype)
        # NOTE: the decay parameters and the norm weight stay float32 whatever the model dtype: the Qwen3.5
        # checkpoints store A_log and norm.weight in float32, and float32 holds a bfloat16 checkpoint exactly.
        self.A_log = nn.Parameter(torch.zeros(num_v_heads, dtype=torch.float32))
        self.dt_bias = nn.Parameter(torch.ones(num_v_heads, dtype=torch.float32))
        self.norm = GatedRMSNorm(head_v_dim, eps=rms_norm_eps, dtype=torch.float32, activation="silu")
        self.out_proj = RowParallelLinear(full_value_dim, hidden_size, dtype=dtype)

    def weight_loaders(self) -> dict[str, WeightSlot]:
        """This rank's value heads of ``A_log`` / ``dt_bias`` and its share of each conv ``[q | k | v]`` block."""
        rank, size = self.tp_rank, self.tp_size
        return {
            "A_log": sharded_slot(self, "A_log", 0, rank, size),
            "dt_bias": sharded_slot(self, "dt_bias", 0, rank, size),
            "conv1d.weight": blocks_slot(self.conv1d, "weight", self.conv_blocks, rank, size),
        }

    @classmethod
    def from_config(
        cls, hf_config, layer_idx: int, dtype: torch.dtype = torch.float32, projection: str = "qkvz"
    ) -> "GatedDeltaNet":
        """Build from a transformers ``Qwen3NextConfig`` (``projection="qkvz"``) or ``Qwen3_5TextConfig`` (``"split"``)."""
        return cls(
            hf_config.hidden_size,
            hf_config.linear_num_key_heads,
            hf_config.linear_num_value_heads,
            hf_config.linear_key_head_dim,
            hf_config.linear_value_head_dim,
            conv_kernel_size=hf_config.linear_conv_kernel_dim,
            rms_norm_eps=hf_config.rms_norm_eps,
            projection=projection,
            conv_activation=getattr(hf_config, "hidden_act", "silu"),
            layer_idx=layer_idx,
            dtype=dtype,
        )

    def _index(self, device: torch.device) -> torch.Tensor:
        if device not in self._device_index:
            self._device_index[device] = self._gather_index.to(device)
        return self._device_index[device]

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``mixed_qkv [T, conv_dim]`` (``[q | k | v]``), ``z [T, Hv, Dv]``, ``b, a [T, Hv]`` from ``x [T, hidden]``,
        views of one GEMM's output (gathered into that order for ``"qkvz"``)."""
        y = self.in_proj(x)
        if self.projection == "qkvz":
            y = y.index_select(-1, self._index(x.device))
        mixed_qkv, z, b, a = y.split(self.output_split, dim=-1)
        return mixed_qkv, z.view(x.shape[0], self.num_v_heads, self.head_v_dim), b, a

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        ctx = self.batch_context(hidden_states)
        mixed_qkv, z, b, a = self.project(hidden_states)
        q, k, v = self.split_qkv(self.short_conv(mixed_qkv, self.conv1d.weight.squeeze(1), ctx))
        g, beta = gdn_gate(a, b, self.A_log, self.dt_bias)  # [T, Hv] float32 each
        o = self.norm(self.delta_rule(q, k, v, g, beta, ctx), z)
        return self.out_proj(o.reshape(hidden_states.shape[0], -1))
