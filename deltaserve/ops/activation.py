"""Gated activations of the MLPs and experts: ``act(gate) * up`` over a ``[..., gate | up]`` tensor
(vLLM's ``SiluAndMul``), one launch on the GPU instead of an activation and a product."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from deltaserve.ops import dispatch

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"silu": F.silu, "swish": F.silu, "gelu": F.gelu}


def check_activation(name: str) -> None:
    """ValueError naming the supported activations unless ``name`` is one (a config's ``hidden_act``)."""
    if name not in ACTIVATIONS:
        raise ValueError(f"hidden_act {name!r} is not supported; supported: {sorted(ACTIVATIONS)}")


def act_and_mul_ref(x: torch.Tensor, activation: str = "silu") -> torch.Tensor:
    """Torch reference of :func:`act_and_mul`."""
    gate, up = x.chunk(2, dim=-1)
    return ACTIVATIONS[activation](gate) * up


def act_and_mul(x: torch.Tensor, activation: str = "silu") -> torch.Tensor:
    """``act(x[..., :n]) * x[..., n:]`` for ``x [..., 2n]`` -> ``[..., n]`` in ``x.dtype``."""
    check_activation(activation)
    return dispatch("activation", "act_and_mul", x, act_and_mul_ref)(x, activation)
