"""RMSNorm and sigmoid- or SiLU-gated RMSNorm on the GPU through fla-core's fused Triton norm kernels (forward only).

Same contract as :mod:`deltaserve.ops.norm`: float32 statistics and arithmetic, output in ``x.dtype``.
"""

from __future__ import annotations

import torch
from fla.modules.norm.fused_norm_gate import layer_norm_gated_fwd
from fla.modules.norm.layernorm import layer_norm_fwd


def _rows(x: torch.Tensor) -> torch.Tensor:
    # fla's kernels address rows as row * D: [N, D] contiguous.
    return x.reshape(-1, x.shape[-1]).contiguous()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * RMSNorm(x)`` over the last dim, one launch; returns ``x.dtype``."""
    y, _, _, _ = layer_norm_fwd(_rows(x), weight, None, eps, is_rms_norm=True)
    return y.view(x.shape)


def zero_centered_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``(1 + weight) * RMSNorm(x)``, float32 throughout, one norm launch; returns ``x.dtype``."""
    y, _, _, _ = layer_norm_fwd(_rows(x), 1.0 + weight.float(), None, eps, is_rms_norm=True)
    return y.view(x.shape)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weight * RMSNorm(x + residual), x + residual)``, one launch; the sum in float32, stored in ``residual.dtype``."""
    y, _, _, summed = layer_norm_fwd(_rows(x), weight, None, eps, residual=_rows(residual), is_rms_norm=True)
    return y.view(x.shape), summed.view(x.shape)


def add_zero_centered_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``((1 + weight) * RMSNorm(x + residual), x + residual)``, as :func:`add_rms_norm`."""
    y, _, _, summed = layer_norm_fwd(
        _rows(x), 1.0 + weight.float(), None, eps, residual=_rows(residual), is_rms_norm=True
    )
    return y.view(x.shape), summed.view(x.shape)


def gated_rms_norm(
    x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float, activation: str = "sigmoid"
) -> torch.Tensor:
    """``RMSNorm(x) * weight * act(gate)`` (sigmoid or SiLU) over the last dim, one launch; returns ``x.dtype``."""
    if gate.shape != x.shape:
        gate = gate.reshape(x.shape)
    # fla names SiLU "swish"
    fla_activation = "swish" if activation == "silu" else activation
    y, _, _, _ = layer_norm_gated_fwd(_rows(x), _rows(gate), weight, None, activation=fla_activation, eps=eps,
                                      is_rms_norm=True)
    return y.view(x.shape)
