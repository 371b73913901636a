"""Depthwise causal conv1d over a flat varlen batch, reading and writing conv states in a slot pool.

The conv state of a slot keeps the last ``L = state_len >= K - 1`` conv **inputs** (pre-activation),
newest last, in SD orientation ``[L, D]``; callers holding a DS pool pass ``.transpose(-1, -2)``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from deltaserve.ops import dispatch
from deltaserve.ops.state_checkpoints import save_conv_windows

if TYPE_CHECKING:
    from deltaserve.forward_context import StateCheckpoints


def _activate(x: torch.Tensor, activation: str | None) -> torch.Tensor:
    if activation is None:
        return x
    if activation in ("silu", "swish"):
        return F.silu(x)
    raise ValueError(f"activation must be 'silu', 'swish' or None, got {activation!r}")


def _check_state(weight: torch.Tensor, conv_state: torch.Tensor, dim: int) -> None:
    kernel = weight.shape[-1]
    if weight.dim() != 2 or weight.shape[0] != dim:
        raise ValueError(f"weight must be [D={dim}, K], got {tuple(weight.shape)}")
    if conv_state.dim() != 3 or conv_state.shape[-1] != dim or conv_state.shape[1] < kernel - 1:
        raise ValueError(
            f"conv_state must be [num_slots+1, L >= K-1 = {kernel - 1}, D={dim}] (SD view), "
            f"got {tuple(conv_state.shape)}"
        )


def causal_conv1d_fn_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    conv_state: torch.Tensor,
    cu_seqlens: torch.Tensor,
    state_indices: torch.Tensor,
    has_initial_state: torch.Tensor,
    activation: str | None = "silu",
) -> torch.Tensor:
    """Torch reference of :func:`causal_conv1d_fn` (float32 compute, a Python loop over sequences)."""
    dim, kernel = weight.shape[0], weight.shape[-1]
    _check_state(weight, conv_state, dim)
    state_len = conv_state.shape[1]
    w = weight.float().unsqueeze(1)  # [D, 1, K]
    out = torch.empty_like(x)
    bounds = cu_seqlens.tolist()
    slots = state_indices.tolist()
    initial = has_initial_state.tolist()
    for b, slot in enumerate(slots):
        start, end = bounds[b], bounds[b + 1]
        if end == start:
            continue
        if initial[b]:
            history = conv_state[slot].float()  # [L, D]
        else:
            history = x.new_zeros((state_len, dim), dtype=torch.float32)
        full = torch.cat([history, x[start:end].float()], dim=0)  # [L + n, D]
        window = full[state_len - (kernel - 1) :].t().unsqueeze(0)  # [1, D, K-1+n]
        y = F.conv1d(window, w, groups=dim)[0].t()  # [n, D]
        out[start:end] = _activate(y, activation).to(x.dtype)
        conv_state[slot] = full[-state_len:].to(conv_state.dtype)
    return out


def causal_conv1d_update_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    conv_state: torch.Tensor,
    state_indices: torch.Tensor,
    activation: str | None = "silu",
) -> torch.Tensor:
    """Torch reference of :func:`causal_conv1d_update` (vectorised over sequences)."""
    dim, kernel = weight.shape[0], weight.shape[-1]
    _check_state(weight, conv_state, dim)
    if x.dim() != 2 or x.shape[0] != state_indices.shape[0]:
        raise ValueError(f"x must be [B={state_indices.shape[0]}, D], one token per sequence, got {tuple(x.shape)}")
    index = state_indices.long()
    full = torch.cat([conv_state[index].float(), x.float().unsqueeze(1)], dim=1)  # [B, L+1, D]
    y = (full[:, -kernel:] * weight.float().t().unsqueeze(0)).sum(dim=1)  # [B, D]
    conv_state[index] = full[:, 1:].to(conv_state.dtype)
    return _activate(y, activation).to(x.dtype)


def causal_conv1d_fn(
    x: torch.Tensor,
    weight: torch.Tensor,
    conv_state: torch.Tensor,
    cu_seqlens: torch.Tensor,
    state_indices: torch.Tensor,
    has_initial_state: torch.Tensor,
    activation: str | None = "silu",
    checkpoints: "StateCheckpoints | None" = None,
) -> torch.Tensor:
    """Causal depthwise conv of each sequence of a flat batch; updates the sequences' conv states in place.

    ``x [T, D]``, ``weight [D, K]``, ``conv_state [num_slots+1, L, D]`` (SD view), ``cu_seqlens [B+1]``
    int32, ``state_indices [B]`` int32, ``has_initial_state [B]`` bool. A sequence starts from the
    last ``K-1`` rows of its slot (or zeros); its slot then holds its last ``L`` inputs. Returns
    ``act(conv(x))`` ``[T, D]`` in ``x.dtype``. ``checkpoints``: slots that also get the window of
    ``L`` inputs before a position inside a sequence (one gather, any device).
    """
    if checkpoints is not None:
        save_conv_windows(x, conv_state, checkpoints)
    impl = dispatch("conv1d", "causal_conv1d_fn", x, causal_conv1d_fn_ref)
    return impl(x, weight, conv_state, cu_seqlens, state_indices, has_initial_state, activation)


def causal_conv1d_update(
    x: torch.Tensor,
    weight: torch.Tensor,
    conv_state: torch.Tensor,
    state_indices: torch.Tensor,
    activation: str | None = "silu",
) -> torch.Tensor:
    """Decode step: ``x [B, D]`` is one new token per sequence; each slot's window shifts by one, in place."""
    impl = dispatch("conv1d", "causal_conv1d_update", x, causal_conv1d_update_ref)
    return impl(x, weight, conv_state, state_indices, activation)
