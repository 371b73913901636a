"""Kimi Delta Attention layer: projections, short convs, KDA on the slot pool, gated norm, output projection.

Parameter names are those of the Kimi-Linear checkpoints (``q_conv1d``, ``f_a_proj``, ``A_log``, ...),
so weights load by name. Batch metadata comes from :func:`deltaserve.forward_context.get_forward_context`,
states from the pool views given to :meth:`KimiDeltaAttention.bind_state`.
"""

from __future__ import annotations

import torch
from torch import nn

from deltaserve.distributed.parallel_state import get_tp_group
from deltaserve.distributed.sharding import WeightSlot, sharded_slot
from deltaserve.layers.delta_rule import DeltaRuleMixer
from deltaserve.layers.derived import DerivedTensor
from deltaserve.layers.linear import ColumnParallelLinear, LinearBlock, MergedLinear, RowParallelLinear
from deltaserve.layers.norm import GatedRMSNorm
from deltaserve.ops.kda import kda_gates
from deltaserve.state.layout import divide


class KimiDeltaAttention(DeltaRuleMixer):
    """KDA token mixer of one layer; ``forward(positions, hidden_states [T, hidden]) -> [T, hidden]``.

    Under TP each rank holds ``num_heads / tp`` heads: their projections, conv channels, decays and
    states (``[q_local | k_local | v_local]`` conv, ``(H/tp, D, D)`` recurrent); ``o_proj`` all-reduces.
    The low-rank ``f_a_proj`` / ``g_a_proj`` (hidden -> head_dim) are replicated.

    The six projections of ``x`` are one GEMM, ``in_proj`` = ``[q | k | v | b | f_a | g_a]`` (this rank's
    heads of the first four, all of the last two); ``q_proj``, ... name its rows for the checkpoint.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        head_dim: int,
        *,
        conv_kernel_size: int = 4,
        rms_norm_eps: float = 1e-5,
        layer_idx: int = 0,
        dtype: torch.dtype = torch.float32,
    ):
        tp_rank, tp_size = get_tp_group().rank, get_tp_group().world_size
        full_width = num_heads * head_dim
        num_heads = divide(num_heads, tp_size, "KDA num_heads (linear_attn_config.num_heads)")  # this rank's
        width = num_heads * head_dim
        super().__init__("kda", (width, width, width), (num_heads, head_dim, head_dim), conv_kernel_size, layer_idx)
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.head_dim = head_dim

        def column(n_in: int, n_out: int) -> ColumnParallelLinear:
            return ColumnParallelLinear(n_in, n_out, dtype=dtype)

        def short_conv() -> nn.Conv1d:
            # NOTE: holds the depthwise weight [H*D, 1, K] under the checkpoint's name; never called.
            return nn.Conv1d(width, width, conv_kernel_size, groups=width, bias=False, dtype=dtype)

        blocks = [LinearBlock(name, full_width) for name in ("q_proj", "k_proj", "v_proj")]
        blocks += [LinearBlock("b_proj", num_heads * tp_size)]
        blocks += [LinearBlock(name, head_dim, sharded=False) for name in ("f_a_proj", "g_a_proj")]
        self.in_proj = MergedLinear(hidden_size, blocks, dtype=dtype)
        self.q_proj, self.k_proj, self.v_proj, self.b_proj, self.f_a_proj, self.g_a_proj = self.in_proj.views
        self.q_conv1d, self.k_conv1d, self.v_conv1d = short_conv(), short_conv(), short_conv()
        # NOTE: the decay parameters stay float32 whatever the model dtype, as in the checkpoints.
        self.A_log = nn.Parameter(torch.zeros(1, 1, num_heads, 1, dtype=torch.float32))
        self.dt_bias = nn.Parameter(torch.zeros(width, dtype=torch.float32))
        self.f_b_proj, self.g_b_proj = column(head_dim, full_width), column(head_dim, full_width)
        self.o_norm = GatedRMSNorm(head_dim, eps=rms_norm_eps, dtype=dtype)
        self.o_proj = RowParallelLinear(full_width, hidden_size, dtype=dtype)

        self._conv_weight = DerivedTensor(lambda q, k, v: torch.cat([q.squeeze(1), k.squeeze(1), v.squeeze(1)], dim=0))

    @classmethod
    def from_config(cls, hf_config, layer_idx: int, dtype: torch.dtype = torch.float32) -> "KimiDeltaAttention":
        """Build from a transformers ``KimiLinearConfig``."""
        return cls(
            hf_config.hidden_size,
            hf_config.linear_num_heads,
            hf_config.linear_head_dim,
            conv_kernel_size=hf_config.linear_conv_kernel_dim,
            rms_norm_eps=hf_config.rms_norm_eps,
            layer_idx=layer_idx,
            dtype=dtype,
        )

    def weight_loaders(self) -> dict[str, WeightSlot]:
        """This rank's heads of the conv weights (dim 0), ``A_log`` (dim 2) and ``dt_bias`` (dim 0)."""
        rank, size = self.tp_rank, self.tp_size
        slots = {"A_log": sharded_slot(self, "A_log", 2, rank, size)}
        slots["dt_bias"] = sharded_slot(self, "dt_bias", 0, rank, size)
        for name in ("q_conv1d", "k_conv1d", "v_conv1d"):
            slots[f"{name}.weight"] = sharded_slot(getattr(self, name), "weight", 0, rank, size)
        return slots

    def fuse_conv_weights(self) -> torch.Tensor:
        """``[3*H*D, K]`` conv weight of the concatenated ``[q | k | v]`` channels, cached until a weight changes."""
        return self._conv_weight(self.q_conv1d.weight, self.k_conv1d.weight, self.v_conv1d.weight)

    # ---- forward -----------------------------------------------------------------------------

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        ctx = self.batch_context(hidden_states)
        x = hidden_states
        # NOTE: views of one GEMM's output (row stride: its full width); the conv kernels take strides.
        width = self.num_heads * self.head_dim
        mixed_qkv, b, f_a, g_a = self.in_proj(x).split([3 * width, self.num_heads, self.head_dim, self.head_dim], -1)
        q, k, v = self.split_qkv(self.short_conv(mixed_qkv, self.fuse_conv_weights(), ctx))
        # NOTE: beta = sigmoid(b) in float32 (as vLLM), the same as transformers' at fp32.
        g, beta = kda_gates(self.f_b_proj(f_a), b, self.A_log, self.dt_bias)  # [T, H, D], [T, H] float32
        o = self.delta_rule(q, k, v, g, beta, ctx)
        gate = self.g_b_proj(g_a).reshape(v.shape)
        o = self.o_norm(o, gate).reshape(x.shape[0], -1)
        return self.o_proj(o)
