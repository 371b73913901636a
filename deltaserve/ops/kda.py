"""Kimi Delta Attention ops: the forget gate, chunked prefill and one-token decode, on a slot pool.

Per head, with ``q^ = l2norm(q) * scale`` and ``k^ = l2norm(k)``:
``S_t = (I - b_t k^_t k^_t^T) Diag(exp g_t) S_{t-1} + b_t k^_t v_t^T`` and ``o_t = S_t^T q^_t``.
``S`` is ``Dk x Dv`` in the math and stored transposed, ``(Dv, Dk)``, in the float32 pool.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from deltaserve.ops import dispatch
from deltaserve.ops.state_checkpoints import check_checkpoints

if TYPE_CHECKING:
    from deltaserve.forward_context import StateCheckpoints

L2NORM_EPS = 1e-6
# Tokens per chunk of the chunked kernels; states exist at every chunk boundary of a prefill.
CHUNK_SIZE = 64


def l2norm(x: torch.Tensor, eps: float = L2NORM_EPS) -> torch.Tensor:
    """``x / sqrt(sum(x^2) + eps)`` over the last dim.

    NOTE: ``+ eps`` inside the sqrt (as fla and transformers do), not ``F.normalize``'s ``max(norm, eps)``.
    """
    return x / torch.sqrt((x * x).sum(dim=-1, keepdim=True) + eps)


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


def _prepare(q, k, v, g, beta, scale, use_qk_l2norm_in_kernel):
    q, k, v, g, beta = (t.float() for t in (q, k, v, g, beta))
    if use_qk_l2norm_in_kernel:
        q, k = l2norm(q), l2norm(k)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return q * scale, k, v, g, beta


def _chunk_sequence(q, k, v, g, beta, state, chunk_size, save=None):
    """One sequence, heads first: ``q,k,g [H,n,K]``, ``v [H,n,V]``, ``beta [H,n]``, ``state [H,K,V]`` (math order).

    ``save(offset, state)`` is called with the state after each chunk boundary ``offset`` (a checkpoint).

    WY / UT-transform form (as transformers' ``chunk_kimi_delta_attention``): within a chunk with
    cumulative log-decay ``G``, ``T = (I - A)^-1`` with ``A[i,j] = -b_i (k_i * exp(G_i - G_j)) . k_j``
    (``j < i``) turns the chunk's delta rule into matrix products. Returns ``o [H,n,V]`` and the final state.
    """
    heads, length, _ = k.shape
    out = v.new_empty(v.shape)
    for start in range(0, length, chunk_size):
        end = min(start + chunk_size, length)
        size = end - start
        q_c, k_c, v_c = q[:, start:end], k[:, start:end], v[:, start:end]
        b_c = beta[:, start:end].unsqueeze(-1)  # [H, C, 1]
        G = g[:, start:end].cumsum(dim=1)  # [H, C, K]
        lower = torch.tril(torch.ones(size, size, dtype=torch.bool, device=q.device))
        # exp(G_i - G_j) for j <= i; NOTE: mask before exp, as G_i - G_j > 0 above the diagonal can overflow.
        diff = (G.unsqueeze(2) - G.unsqueeze(1)).masked_fill(~lower[None, :, :, None], float("-inf"))
        decay = diff.exp()  # [H, C(i), C(j), K]
        kk = torch.einsum("hik,hijk,hjk->hij", k_c, decay, k_c)
        strict = torch.tril(b_c * kk, diagonal=-1)  # b_i k_i Γ_ij k_j, j < i
        eye = torch.eye(size, dtype=q.dtype, device=q.device).expand(heads, size, size)
        T = torch.linalg.solve_triangular(eye + strict, eye, upper=False, unitriangular=True)
        u = T @ (v_c * b_c)  # [H, C, V]
        w = T @ (k_c * b_c * G.exp())  # [H, C, K]
        qk = torch.einsum("hik,hijk,hjk->hij", q_c, decay, k_c)  # already zero above the diagonal
        v_new = u - w @ state
        out[:, start:end] = (q_c * G.exp()) @ state + qk @ v_new
        G_last = G[:, -1:]  # [H, 1, K]
        state = state * G_last.transpose(1, 2).exp() + (k_c * (G_last - G).exp()).transpose(1, 2) @ v_new
        if save is not None and end < length:
            save(end, state)
    return out, state


def chunk_kda_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    recurrent_state: torch.Tensor,
    cu_seqlens: torch.Tensor,
    state_indices: torch.Tensor,
    has_initial_state: torch.Tensor,
    *,
    scale: float | None = None,
    use_qk_l2norm_in_kernel: bool = True,
    chunk_size: int = CHUNK_SIZE,
    checkpoints: "StateCheckpoints | None" = None,
) -> torch.Tensor:
    """Torch reference of :func:`chunk_kda` (loops over sequences and chunks, vectorised inside a chunk)."""
    heads, v_dim, k_dim = recurrent_state.shape[1:]
    if q.shape[1:] != (heads, k_dim) or v.shape[1:] != (heads, v_dim):
        raise ValueError(
            f"chunk_kda: q [T, H, K] = {tuple(q.shape)} and v [T, H, V] = {tuple(v.shape)} do not match "
            f"recurrent_state [slots, H, V, K] = {tuple(recurrent_state.shape)}"
        )
    qf, kf, vf, gf, bf = _prepare(q, k, v, g, beta, scale, use_qk_l2norm_in_kernel)
    out = torch.empty(v.shape, dtype=q.dtype, device=q.device)
    bounds = cu_seqlens.tolist()
    initial = has_initial_state.tolist()
    if checkpoints is not None:
        query_lens = [e - s for s, e in zip(bounds[:-1], bounds[1:])]
        check_checkpoints(checkpoints, query_lens, recurrent_state.shape[0] - 1, chunk_size)
    for b, slot in enumerate(state_indices.tolist()):
        start, end = bounds[b], bounds[b + 1]
        if end == start:
            continue
        if initial[b]:
            state = recurrent_state[slot].float().transpose(-1, -2)  # [H, K, V]
        else:
            state = qf.new_zeros((heads, k_dim, v_dim))
        seq = [t[start:end].transpose(0, 1) for t in (qf, kf, vf, gf, bf)]  # heads first
        save = None
        if checkpoints is not None and (targets := dict(checkpoints.for_sequence(b))):

            def save(offset: int, state: torch.Tensor, targets=targets) -> None:
                if offset in targets:
                    recurrent_state[targets[offset]] = state.transpose(-1, -2).to(recurrent_state.dtype)

        o, state = _chunk_sequence(*seq, state, chunk_size, save)
        out[start:end] = o.transpose(0, 1).to(q.dtype)
        recurrent_state[slot] = state.transpose(-1, -2).to(recurrent_state.dtype)
    return out


def fused_recurrent_kda_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    recurrent_state: torch.Tensor,
    state_indices: torch.Tensor,
    *,
    scale: float | None = None,
    use_qk_l2norm_in_kernel: bool = True,
) -> torch.Tensor:
    """Torch reference of :func:`fused_recurrent_kda` (vectorised over sequences and heads)."""
    if q.dim() != 3 or q.shape[0] != state_indices.shape[0]:
        raise ValueError(f"fused_recurrent_kda: q must be [B={state_indices.shape[0]}, H, K], got {tuple(q.shape)}")
    qf, kf, vf, gf, bf = _prepare(q, k, v, g, beta, scale, use_qk_l2norm_in_kernel)
    index = state_indices.long()
    state = recurrent_state[index].float().transpose(-1, -2)  # [B, H, K, V]
    state = state * gf.exp().unsqueeze(-1)
    delta = (vf - (state * kf.unsqueeze(-1)).sum(dim=-2)) * bf.unsqueeze(-1)  # [B, H, V]
    state = state + kf.unsqueeze(-1) * delta.unsqueeze(-2)
    out = (state * qf.unsqueeze(-1)).sum(dim=-2)
    recurrent_state[index] = state.transpose(-1, -2).to(recurrent_state.dtype)
    return out.to(q.dtype)


def kda_gate(f: torch.Tensor, A_log: torch.Tensor, dt_bias: torch.Tensor) -> torch.Tensor:
    """Log-space forget gate ``g [T, H, K]`` float32 ``= -exp(A_log) * softplus(f + dt_bias)``.

    ``f [T, H*K]`` is the output of ``f_b_proj``; ``A_log`` has ``H`` elements (``[1,1,H,1]`` in checkpoints).
    """
    return dispatch("kda", "kda_gate", f, kda_gate_ref)(f, A_log, dt_bias)


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
    *,
    scale: float | None = None,
    use_qk_l2norm_in_kernel: bool = True,
    chunk_size: int = CHUNK_SIZE,
    checkpoints: "StateCheckpoints | None" = None,
) -> torch.Tensor:
    """KDA over a flat varlen batch; reads and writes each sequence's slot in place.

    ``q, k [T, H, K]``, ``v [T, H, V]``, ``g [T, H, K]`` float32 log-decay, ``beta [T, H]``,
    ``recurrent_state [num_slots+1, H, V, K]`` float32 (stored ``(Dv, Dk)``). A sequence starts from
    its slot when ``has_initial_state`` else zeros; its final state is written back. Returns
    ``o [T, H, V]`` in ``q.dtype``. ``checkpoints``: the state after chunk boundary ``offset`` of a
    sequence is also written, in float32, to the checkpoint's slot (the chunk is not cut).
    """
    impl = dispatch("kda", "chunk_kda", q, chunk_kda_ref)
    return impl(
        q, k, v, g, beta, recurrent_state, cu_seqlens, state_indices, has_initial_state,
        scale=scale, use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel, chunk_size=chunk_size,
        checkpoints=checkpoints,
    )  # fmt: skip


def fused_recurrent_kda(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    recurrent_state: torch.Tensor,
    state_indices: torch.Tensor,
    *,
    scale: float | None = None,
    use_qk_l2norm_in_kernel: bool = True,
) -> torch.Tensor:
    """Decode step, one token per sequence: ``q, k, g [B, H, K]``, ``v [B, H, V]``, ``beta [B, H]``.

    Reads and updates each sequence's slot of ``recurrent_state [num_slots+1, H, V, K]`` in place;
    returns ``o [B, H, V]`` in ``q.dtype``.
    """
    impl = dispatch("kda", "fused_recurrent_kda", q, fused_recurrent_kda_ref)
    return impl(
        q, k, v, g, beta, recurrent_state, state_indices,
        scale=scale, use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel,
    )  # fmt: skip
