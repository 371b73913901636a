"""RMSNorm, zero-centred RMSNorm and gated RMSNorm, computed in float32.

Kimi-Linear's ``KimiLinearRMSNorm`` / ``RMSNormGated``; Qwen3-Next's and Qwen3.5's ``RMSNorm``, which
stores ``w`` and scales by ``1 + w`` (zero-centred), and ``Qwen3NextRMSNormGated`` (the gate through
sigmoid for KDA, SiLU for GDN).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from deltaserve.ops import dispatch


def _normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    x = x.float()
    return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps)


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Torch reference of :func:`rms_norm`."""
    # NOTE: round the normalized input to x.dtype before the weight, as KimiLinearRMSNorm does.
    return (weight * _normalize(x, eps).to(x.dtype)).to(x.dtype)


GATE_ACTIVATIONS = ("sigmoid", "silu")


def _check_activation(activation: str) -> None:
    if activation not in GATE_ACTIVATIONS:
        raise ValueError(f"gated_rms_norm: activation must be one of {GATE_ACTIVATIONS}, got {activation!r}")


def gated_rms_norm_ref(
    x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float, activation: str = "sigmoid"
) -> torch.Tensor:
    """Torch reference of :func:`gated_rms_norm`."""
    _check_activation(activation)
    gate = gate.float()
    gate = torch.sigmoid(gate) if activation == "sigmoid" else F.silu(gate)
    return (_normalize(x, eps) * weight.float() * gate).to(x.dtype)


def zero_centered_rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Torch reference of :func:`zero_centered_rms_norm`."""
    # NOTE: scaled in float32 and rounded once, as Qwen3NextRMSNorm does (Kimi rounds before the weight).
    return (_normalize(x, eps) * (1.0 + weight.float())).to(x.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * RMSNorm(x)`` over the last dim, float32 statistics; returns ``x.dtype``."""
    return dispatch("norm", "rms_norm", x, rms_norm_ref)(x, weight, eps)


def gated_rms_norm(
    x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float, activation: str = "sigmoid"
) -> torch.Tensor:
    """``RMSNorm(x) * weight * act(gate)`` over the last dim, all in float32; returns ``x.dtype``.

    ``gate`` has ``x``'s shape (``[T, H, D]``, normalised per head); ``act`` is sigmoid (KDA) or SiLU (GDN).
    """
    _check_activation(activation)
    return dispatch("norm", "gated_rms_norm", x, gated_rms_norm_ref)(x, gate, weight, eps, activation)


def zero_centered_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``(1 + weight) * RMSNorm(x)`` over the last dim, all in float32; returns ``x.dtype``."""
    return dispatch("norm", "zero_centered_rms_norm", x, zero_centered_rms_norm_ref)(x, weight, eps)


def add_rms_norm_ref(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch reference of :func:`add_rms_norm`."""
    summed = x + residual
    return rms_norm_ref(summed, weight, eps), summed


def add_zero_centered_rms_norm_ref(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch reference of :func:`add_zero_centered_rms_norm`."""
    summed = x + residual
    return zero_centered_rms_norm_ref(summed, weight, eps), summed


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rms_norm(x + residual), x + residual)``: the pre-norm block's residual add and norm in one
    (one launch on the GPU, where the norm takes the float32 sum before it is rounded to ``x.dtype``)."""
    return dispatch("norm", "add_rms_norm", x, add_rms_norm_ref)(x, residual, weight, eps)


def add_zero_centered_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(zero_centered_rms_norm(x + residual), x + residual)``, as :func:`add_rms_norm`."""
    impl = dispatch("norm", "add_zero_centered_rms_norm", x, add_zero_centered_rms_norm_ref)
    return impl(x, residual, weight, eps)
