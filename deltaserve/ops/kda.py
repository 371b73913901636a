"""Kimi Delta Attention ops: the per-channel forget gate (alone, or with the write strength ``beta``),
and the delta rule with that gate.

The algorithm lives in :mod:`deltaserve.ops.delta_rule` (shared with GDN); ``chunk_kda`` and
``fused_recurrent_kda`` are its entry points for a gate ``g [T, H, K]``, one log-decay per key channel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from deltaserve.ops import dispatch
from deltaserve.ops.delta_rule import chunk_delta_rule, fused_recurrent_delta_rule


def check_gate_shapes(f: torch.Tensor, A_log: torch.Tensor, dt_bias: torch.Tensor) -> int:
    """The head count ``H = A_log.numel()``, after checking ``f [T, H*K]`` against it and ``dt_bias [H*K]``."""
    heads = A_log.numel()
    if f.shape[-1] % heads != 0 or dt_bias.numel() != f.shape[-1]:
        raise ValueError(
            f"kda_gate: f [T, H*K] = {tuple(f.shape)} must match dt_bias [H*K] = {tuple(dt_bias.shape)} and H = {heads}"
        )
    return heads


def kda_gate_ref(f: torch.Tensor, A_log: torch.Tensor, dt_bias: torch.Tensor) -> torch.Tensor:
    """Torch reference of :func:`kda_gate`."""
    heads = check_gate_shapes(f, A_log, dt_bias)
    gate = (f.float() + dt_bias.float()).view(*f.shape[:-1], heads, -1)  # [T, H, K]
    # NOTE: softplus is linear above 20, as in fla and transformers (threshold avoids exp overflow).
    return -torch.exp(A_log.float().reshape(heads, 1)) * F.softplus(gate, threshold=20.0)


def kda_gate(f: torch.Tensor, A_log: torch.Tensor, dt_bias: torch.Tensor) -> torch.Tensor:
    """Log-space forget gate ``g [T, H, K]`` float32 ``= -exp(A_log) * softplus(f + dt_bias)``.

    ``f [T, H*K]`` is the output of ``f_b_proj``; ``A_log`` has ``H`` elements (``[1,1,H,1]`` in checkpoints).
    """
    check_gate_shapes(f, A_log, dt_bias)
    return dispatch("kda", "kda_gate", f, kda_gate_ref)(f, A_log, dt_bias)


def kda_gates_ref(
    f: torch.Tensor, b: torch.Tensor, A_log: torch.Tensor, dt_bias: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch reference of :func:`kda_gates`."""
    return kda_gate_ref(f, A_log, dt_bias), torch.sigmoid(b.float())


def kda_gates(
    f: torch.Tensor, b: torch.Tensor, A_log: torch.Tensor, dt_bias: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Both gates of a KDA step: ``g [T, H, K]`` as :func:`kda_gate`, and the write strength
    ``beta [T, H] = sigmoid(b)``, both float32, from ``f [T, H*K]`` and ``b [T, H]`` (``b_proj``'s output;
    either may be a column view of a wider projection)."""
    heads = check_gate_shapes(f, A_log, dt_bias)
    if tuple(b.shape) != (*f.shape[:-1], heads):
        raise ValueError(f"kda_gates: b must be [T, H] = {(*f.shape[:-1], heads)}, got {tuple(b.shape)}")
    return dispatch("kda", "kda_gates", f, kda_gates_ref)(f, b, A_log, dt_bias)


def _check_kda_gate(g: torch.Tensor, op: str) -> None:
    if g.dim() != 3:
        raise ValueError(f"{op}: g must be [T, H, K] (one log-decay per key channel), got {tuple(g.shape)}")


def chunk_kda(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    recurrent_state: torch.Tensor,
    cu_seqlens: torch.Tensor,
    state_indices: torch.Tensor,
    has_initial_state: torch.Tensor,
    **kwargs,
) -> torch.Tensor:
    """:func:`deltaserve.ops.delta_rule.chunk_delta_rule` with KDA's per-channel gate ``g [T, H, K]``."""
    _check_kda_gate(g, "chunk_kda")
    return chunk_delta_rule(q, k, v, g, beta, recurrent_state, cu_seqlens, state_indices, has_initial_state, **kwargs)


def fused_recurrent_kda(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    recurrent_state: torch.Tensor,
    state_indices: torch.Tensor,
    **kwargs,
) -> torch.Tensor:
    """:func:`deltaserve.ops.delta_rule.fused_recurrent_delta_rule` with KDA's per-channel gate ``g [B, H, K]``."""
    _check_kda_gate(g, "fused_recurrent_kda")
    return fused_recurrent_delta_rule(q, k, v, g, beta, recurrent_state, state_indices, **kwargs)
