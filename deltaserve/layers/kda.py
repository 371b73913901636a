"""Kimi Delta Attention layer: projections, short convs, KDA on the slot pool, gated norm, output projection.

Parameter names are those of the Kimi-Linear checkpoints (``q_conv1d``, ``f_a_proj``, ``A_log``, ...),
so weights load by name. Batch metadata comes from :func:`deltaserve.forward_context.get_forward_context`,
states from the pool views given to :meth:`KimiDeltaAttention.bind_state`.
"""

from __future__ import annotations

import torch
from torch import nn

from deltaserve.layers.delta_rule import DeltaRuleMixer
from deltaserve.layers.norm import GatedRMSNorm
from deltaserve.ops.kda import kda_gate


class KimiDeltaAttention(DeltaRuleMixer):
    """KDA token mixer of one layer; ``forward(positions, hidden_states [T, hidden]) -> [T, hidden]``."""

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
        width = num_heads * head_dim
        super().__init__("kda", (width, width, width), (num_heads, head_dim, head_dim), conv_kernel_size, layer_idx)
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.head_dim = head_dim

        def linear(n_in: int, n_out: int) -> nn.Linear:
            return nn.Linear(n_in, n_out, bias=False, dtype=dtype)

        def short_conv() -> nn.Conv1d:
            # NOTE: holds the depthwise weight [H*D, 1, K] under the checkpoint's name; never called.
            return nn.Conv1d(width, width, conv_kernel_size, groups=width, bias=False, dtype=dtype)

        self.q_proj = linear(hidden_size, width)
        self.k_proj = linear(hidden_size, width)
        self.v_proj = linear(hidden_size, width)
        self.q_conv1d, self.k_conv1d, self.v_conv1d = short_conv(), short_conv(), short_conv()
        # NOTE: the decay parameters stay float32 whatever the model dtype, as in the checkpoints.
        self.A_log = nn.Parameter(torch.zeros(1, 1, num_heads, 1, dtype=torch.float32))
        self.dt_bias = nn.Parameter(torch.zeros(width, dtype=torch.float32))
        self.f_a_proj, self.f_b_proj = linear(hidden_size, head_dim), linear(head_dim, width)
        self.b_proj = linear(hidden_size, num_heads)
        self.g_a_proj, self.g_b_proj = linear(hidden_size, head_dim), linear(head_dim, width)
        self.o_norm = GatedRMSNorm(head_dim, eps=rms_norm_eps, dtype=dtype)
        self.o_proj = linear(width, hidden_size)

        self._conv_weight: torch.Tensor | None = None
        self._conv_weight_key: tuple | None = None

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

    def fuse_conv_weights(self) -> torch.Tensor:
        """``[3*H*D, K]`` conv weight of the concatenated ``[q | k | v]`` channels, cached until a weight changes."""
        weights = (self.q_conv1d.weight, self.k_conv1d.weight, self.v_conv1d.weight)
        # NOTE: in-place loads (load_state_dict, copy_) bump _version, so the cache cannot go stale.
        key = tuple((w.data_ptr(), w._version, w.device, w.dtype) for w in weights)
        if self._conv_weight is None or key != self._conv_weight_key:
            self._conv_weight = torch.cat([w.detach().squeeze(1) for w in weights], dim=0)
            self._conv_weight_key = key
        return self._conv_weight

    # ---- forward -----------------------------------------------------------------------------

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        ctx = self.batch_context(hidden_states)
        x = hidden_states
        mixed_qkv = torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], dim=-1)  # [T, 3*H*D]
        q, k, v = self.split_qkv(self.short_conv(mixed_qkv, self.fuse_conv_weights(), ctx))
        g = kda_gate(self.f_b_proj(self.f_a_proj(x)), self.A_log, self.dt_bias)  # [T, H, D] float32
        # NOTE: sigmoid in float32 (as vLLM), the same as transformers' at fp32.
        beta = torch.sigmoid(self.b_proj(x).float())  # [T, H]
        o = self.delta_rule(q, k, v, g, beta, ctx)
        gate = self.g_b_proj(self.g_a_proj(x)).reshape(v.shape)
        o = self.o_norm(o, gate).reshape(x.shape[0], -1)
        return self.o_proj(o)
