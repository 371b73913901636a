"""Gated MLP (SwiGLU): ``down(act(gate(x)) * up(x))``; checkpoint names ``{gate,up,down}_proj``, with
``gate`` and ``up`` one GEMM (``gate_up_proj``, vLLM's name)."""

from __future__ import annotations

import torch
from torch import nn

from deltaserve.layers.linear import LinearBlock, MergedLinear, RowParallelLinear
from deltaserve.ops.activation import act_and_mul, check_activation


class GatedMLP(nn.Module):
    """x ``[T, hidden]`` -> ``[T, hidden]``; under TP the intermediate channels are split (gate/up
    column-, down row-parallel), and ``reduce_results=False`` leaves the partial sum to the caller.
    ``gate_up_proj`` holds ``[gate | up]`` (this rank's channels of each); ``gate_proj`` / ``up_proj`` name its rows."""

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        hidden_act: str = "silu",
        dtype: torch.dtype | None = None,
        reduce_results: bool = True,
    ):
        super().__init__()
        what = "MLP intermediate_size"
        blocks = [LinearBlock("gate_proj", intermediate_size), LinearBlock("up_proj", intermediate_size)]
        self.gate_up_proj = MergedLinear(hidden_size, blocks, dtype=dtype, what=what)
        self.gate_proj, self.up_proj = self.gate_up_proj.views
        self.down_proj = RowParallelLinear(
            intermediate_size, hidden_size, reduce_results=reduce_results, dtype=dtype, what=what
        )
        check_activation(hidden_act)
        self.activation = hidden_act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # NOTE: [gate | up] halves of equal width on every rank: one act-and-mul launch.
        return self.down_proj(act_and_mul(self.gate_up_proj(x), self.activation))
