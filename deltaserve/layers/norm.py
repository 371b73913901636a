"""RMSNorm modules over :mod:`deltaserve.ops.norm` (parameter ``weight``, as in the checkpoints)."""

from __future__ import annotations

import torch
from torch import nn

from deltaserve.ops.norm import (
    add_rms_norm,
    add_zero_centered_rms_norm,
    gated_rms_norm,
    rms_norm,
    zero_centered_rms_norm,
)


class RMSNorm(nn.Module):
    """``weight * RMSNorm(x)``; with ``residual``, adds it first and returns ``(normed, new_residual)`` as vLLM does."""

    _norm = staticmethod(rms_norm)
    _add_norm = staticmethod(add_rms_norm)
    _init = staticmethod(torch.ones)

    def __init__(self, hidden_size: int, eps: float = 1e-6, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.weight = nn.Parameter(self._init(hidden_size, dtype=dtype))
        self.eps = eps

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            return self._norm(x, self.weight, self.eps)
        return self._add_norm(x, residual, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}"


class ZeroCenteredRMSNorm(RMSNorm):
    """``(1 + weight) * RMSNorm(x)``, as Qwen3-Next and Qwen3.5 store their norms (``weight`` starts at 0)."""

    _norm = staticmethod(zero_centered_rms_norm)
    _add_norm = staticmethod(add_zero_centered_rms_norm)
    _init = staticmethod(torch.zeros)


class GatedRMSNorm(nn.Module):
    """``RMSNorm(x) * weight * act(gate)`` over the last dim, float32 compute; ``act`` sigmoid (KDA) or SiLU (GDN)."""

    def __init__(
        self, hidden_size: int, eps: float = 1e-6, dtype: torch.dtype = torch.float32, activation: str = "sigmoid"
    ):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype))
        self.eps = eps
        self.activation = activation

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        return gated_rms_norm(x, gate, self.weight, self.eps, self.activation)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}, activation={self.activation}"
