"""Gated MLP (SwiGLU): ``down(act(gate(x)) * up(x))``; checkpoint names ``{gate,up,down}_proj``."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS = {"silu": F.silu, "swish": F.silu, "gelu": F.gelu}


def get_activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The activation function of a config's ``hidden_act``; ValueError naming the supported ones."""
    if name not in ACTIVATIONS:
        raise ValueError(f"hidden_act {name!r} is not supported; supported: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


class GatedMLP(nn.Module):
    """x ``[T, hidden]`` -> ``[T, hidden]``."""

    def __init__(
        self, hidden_size: int, intermediate_size: int, hidden_act: str = "silu", dtype: torch.dtype | None = None
    ):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False, dtype=dtype)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False, dtype=dtype)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False, dtype=dtype)
        self.act_fn = get_activation(hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
