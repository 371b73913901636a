"""The delta rule over a few tokens per sequence, straight from the slots: speculative verify and commit.

``recurrent_delta_rule_varlen`` runs each sequence's tokens (a flat varlen batch, ``cu_seqlens``)
from the state in its slot, one token after the other as the decode step does, and either writes the
final state back (``store_final_state=True``: the commit of accepted tokens) or leaves the slot as
it was (``False``: the verify forward, outputs only). The GPU kernel keeps each state tile in
registers across the tokens: the slot is read once, and written once or not at all.
"""

from __future__ import annotations

import torch

from deltaserve.ops import dispatch
from deltaserve.ops.delta_rule import check_shapes, fused_recurrent_delta_rule_ref


def recurrent_delta_rule_varlen_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    recurrent_state: torch.Tensor,
    cu_seqlens: torch.Tensor,
    state_indices: torch.Tensor,
    *,
    store_final_state: bool = True,
    scale: float | None = None,
    use_qk_l2norm_in_kernel: bool = True,
) -> torch.Tensor:
    """Torch reference of :func:`recurrent_delta_rule_varlen`: one vectorised decode step per position."""
    check_shapes(q, k, v, g, beta, recurrent_state, "recurrent_delta_rule_varlen")
    bounds = cu_seqlens.tolist()
    lengths = [end - start for start, end in zip(bounds[:-1], bounds[1:])]
    if len(lengths) != state_indices.shape[0]:
        raise ValueError(
            f"recurrent_delta_rule_varlen: cu_seqlens has {len(lengths)} sequences, state_indices {state_indices.shape[0]}"
        )
    if store_final_state:
        states, index = recurrent_state, state_indices.long()
    else:
        states = recurrent_state.index_select(0, state_indices.long())  # a copy: the slots stay as they are
        index = torch.arange(len(lengths), device=q.device)
    out = torch.empty(v.shape, dtype=q.dtype, device=q.device)
    for t in range(max(lengths, default=0)):
        rows = [i for i, n in enumerate(lengths) if n > t]
        tokens = torch.tensor([bounds[i] + t for i in rows], device=q.device)
        out[tokens] = fused_recurrent_delta_rule_ref(
            q[tokens], k[tokens], v[tokens], g[tokens], beta[tokens], states, index[rows],
            scale=scale, use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel,
        )  # fmt: skip
    return out


def recurrent_delta_rule_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    recurrent_state: torch.Tensor,
    cu_seqlens: torch.Tensor,
    state_indices: torch.Tensor,
    *,
    store_final_state: bool = True,
    scale: float | None = None,
    use_qk_l2norm_in_kernel: bool = True,
) -> torch.Tensor:
    """The delta rule of each sequence's few tokens from its slot, token by token.

    Shapes as :func:`deltaserve.ops.delta_rule.chunk_delta_rule` (``q, k [T, Hk, Dk]``, ``v [T, Hv, Dv]``,
    ``g [T, Hv(, Dk)]``, ``beta [T, Hv]``, ``cu_seqlens [B+1]``, ``state_indices [B]``); every sequence
    starts from its slot (an initial state is required). ``store_final_state`` writes each final state
    back in place; otherwise no slot is written. Returns ``o [T, Hv, Dv]`` in ``q.dtype``.
    """
    impl = dispatch("delta_rule_varlen", "recurrent_delta_rule_varlen", q, recurrent_delta_rule_varlen_ref)
    return impl(
        q, k, v, g, beta, recurrent_state, cu_seqlens, state_indices,
        store_final_state=store_final_state, scale=scale, use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel,
    )  # fmt: skip
