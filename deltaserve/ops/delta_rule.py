"""The gated delta rule on a slot pool: one chunked prefill and one recurrent decode for KDA and GDN.

Per value head, with ``q^ = l2norm(q) * scale`` and ``k^ = l2norm(k)``:
``S_t = (I - b_t k^_t k^_t^T) Diag(exp g_t) S_{t-1} + b_t k^_t v_t^T`` and ``o_t = S_t^T q^_t``.
``S`` is ``Dk x Dv`` in the math and stored transposed, ``(Dv, Dk)``, in the pool.

The two layer kinds differ only in the gate and the head counts:

- KDA: ``g [T, H, Dk]``, one log-decay per key channel;
- GDN: ``g [T, Hv]``, one per value head, the same for all key channels (broadcast, not a second
  algorithm); q/k carry ``Hk`` heads, each serving ``Hv / Hk`` consecutive value heads (GVA, q/k
  repeated with ``repeat_interleave`` as transformers and fla do).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F

from deltaserve.ops import dispatch
from deltaserve.ops.state_checkpoints import check_checkpoints

if TYPE_CHECKING:
    from deltaserve.forward_context import StateCheckpoints

L2NORM_EPS = 1e-6
# Tokens per chunk of the chunked kernels; a prefill has the state at every chunk boundary.
CHUNK_SIZE = 64


def l2norm(x: torch.Tensor, eps: float = L2NORM_EPS) -> torch.Tensor:
    """``x / sqrt(sum(x^2) + eps)`` over the last dim.

    NOTE: ``+ eps`` inside the sqrt (as fla and transformers do), not ``F.normalize``'s ``max(norm, eps)``.
    """
    return x / torch.sqrt((x * x).sum(dim=-1, keepdim=True) + eps)


class DeltaRuleShape(NamedTuple):
    num_k_heads: int
    num_v_heads: int
    k_dim: int
    v_dim: int
    head_gate: bool  # g is one scalar per value head (GDN), not one per key channel (KDA)


def check_shapes(
    q, k, v, g, beta, recurrent_state: torch.Tensor, op: str, state_indices: torch.Tensor | None = None
) -> DeltaRuleShape:
    """Shapes of a delta-rule call, after checking every tensor against ``recurrent_state [slots, Hv, Dv, Dk]``
    and, for a decode step (one token per sequence), ``q [B, Hk, Dk]`` against ``state_indices [B]``."""
    if state_indices is not None and (q.dim() != 3 or q.shape[0] != state_indices.shape[0]):
        raise ValueError(f"{op}: q must be [B={state_indices.shape[0]}, Hk, Dk], got {tuple(q.shape)}")
    if recurrent_state.dim() != 4:
        raise ValueError(f"{op}: recurrent_state must be [num_slots+1, Hv, Dv, Dk], got {tuple(recurrent_state.shape)}")
    num_v_heads, v_dim, k_dim = recurrent_state.shape[1:]
    num_k_heads = q.shape[1] if q.dim() == 3 else -1
    rows = q.shape[0]
    expected = {
        "q": (q, (rows, num_k_heads, k_dim)),
        "k": (k, (rows, num_k_heads, k_dim)),
        "v": (v, (rows, num_v_heads, v_dim)),
        "beta": (beta, (rows, num_v_heads)),
    }
    for name, (tensor, shape) in expected.items():
        if tuple(tensor.shape) != shape:
            raise ValueError(
                f"{op}: {name} must be {shape} (q/k [T, Hk, Dk], v [T, Hv, Dv], beta [T, Hv] with recurrent_state "
                f"[slots, Hv={num_v_heads}, Dv={v_dim}, Dk={k_dim}]), got {tuple(tensor.shape)}"
            )
    if num_k_heads < 1 or num_v_heads % num_k_heads != 0:
        raise ValueError(f"{op}: Hv = {num_v_heads} value heads must be a multiple of Hk = {num_k_heads} q/k heads")
    if tuple(g.shape) not in ((rows, num_v_heads), (rows, num_v_heads, k_dim)):
        raise ValueError(
            f"{op}: g must be [T, Hv] (GDN) or [T, Hv, Dk] (KDA) = ({rows}, {num_v_heads}[, {k_dim}]), got {tuple(g.shape)}"
        )
    return DeltaRuleShape(num_k_heads, num_v_heads, k_dim, v_dim, g.dim() == 2)


def _prepare(q, k, v, g, beta, shape: DeltaRuleShape, scale, use_qk_l2norm_in_kernel):
    """float32 inputs with q/k repeated to ``Hv`` heads and g ``[T, Hv, Dk or 1]``; q scaled."""
    q, k, v, g, beta = (t.float() for t in (q, k, v, g, beta))
    if use_qk_l2norm_in_kernel:
        q, k = l2norm(q), l2norm(k)
    group = shape.num_v_heads // shape.num_k_heads
    if group > 1:
        q, k = q.repeat_interleave(group, dim=1), k.repeat_interleave(group, dim=1)
    if shape.head_gate:
        g = g.unsqueeze(-1)  # broadcast over the key channels
    scale = shape.k_dim**-0.5 if scale is None else scale
    return q * scale, k, v, g, beta


def _chunk_sequence(q, k, v, g, beta, state, chunk_size, save=None):
    """One sequence, heads first: ``q,k [H,n,K]``, ``g [H,n,K or 1]``, ``v [H,n,V]``, ``beta [H,n]``,
    ``state [H,K,V]`` (math order). ``save(offset, state)`` gets the state at each inner chunk boundary.

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
        G = g[:, start:end].cumsum(dim=1)  # [H, C, K or 1]
        lower = torch.tril(torch.ones(size, size, dtype=torch.bool, device=q.device))
        # exp(G_i - G_j) for j <= i; NOTE: mask before exp, as G_i - G_j > 0 above the diagonal can overflow.
        diff = (G.unsqueeze(2) - G.unsqueeze(1)).masked_fill(~lower[None, :, :, None], float("-inf"))
        decay = diff.exp()  # [H, C(i), C(j), K or 1]; a per-head gate broadcasts in the einsums
        kk = torch.einsum("hik,hijk,hjk->hij", k_c, decay, k_c)
        strict = torch.tril(b_c * kk, diagonal=-1)  # b_i k_i Γ_ij k_j, j < i
        eye = torch.eye(size, dtype=q.dtype, device=q.device).expand(heads, size, size)
        T = torch.linalg.solve_triangular(eye + strict, eye, upper=False, unitriangular=True)
        u = T @ (v_c * b_c)  # [H, C, V]
        w = T @ (k_c * b_c * G.exp())  # [H, C, K]
        qk = torch.einsum("hik,hijk,hjk->hij", q_c, decay, k_c)  # already zero above the diagonal
        v_new = u - w @ state
        out[:, start:end] = (q_c * G.exp()) @ state + qk @ v_new
        G_last = G[:, -1:]  # [H, 1, K or 1]
        state = state * G_last.transpose(1, 2).exp() + (k_c * (G_last - G).exp()).transpose(1, 2) @ v_new
        if save is not None and end < length:
            save(end, state)
    return out, state


def chunk_delta_rule_ref(
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
    """Torch reference of :func:`chunk_delta_rule` (loops over sequences and chunks, vectorised inside a chunk)."""
    shape = check_shapes(q, k, v, g, beta, recurrent_state, "chunk_delta_rule")
    qf, kf, vf, gf, bf = _prepare(q, k, v, g, beta, shape, scale, use_qk_l2norm_in_kernel)
    out = torch.empty(v.shape, dtype=q.dtype, device=q.device)
    bounds = cu_seqlens.tolist()
    initial = has_initial_state.tolist()
    if checkpoints is not None:
        query_lens = [end - start for start, end in zip(bounds[:-1], bounds[1:])]
        check_checkpoints(checkpoints, query_lens, recurrent_state.shape[0] - 1, chunk_size)
    for b, slot in enumerate(state_indices.tolist()):
        start, end = bounds[b], bounds[b + 1]
        if end == start:
            continue
        if initial[b]:
            state = recurrent_state[slot].float().transpose(-1, -2)  # [H, K, V]
        else:
            state = qf.new_zeros((shape.num_v_heads, shape.k_dim, shape.v_dim))
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


def fused_recurrent_delta_rule_ref(
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
    """Torch reference of :func:`fused_recurrent_delta_rule` (vectorised over sequences and heads)."""
    shape = check_shapes(q, k, v, g, beta, recurrent_state, "fused_recurrent_delta_rule", state_indices)
    qf, kf, vf, gf, bf = _prepare(q, k, v, g, beta, shape, scale, use_qk_l2norm_in_kernel)
    index = state_indices.long()
    state = recurrent_state[index].float().transpose(-1, -2)  # [B, H, K, V]
    state = state * gf.exp().unsqueeze(-1)
    delta = (vf - (state * kf.unsqueeze(-1)).sum(dim=-2)) * bf.unsqueeze(-1)  # [B, H, V]
    state = state + kf.unsqueeze(-1) * delta.unsqueeze(-2)
    out = (state * qf.unsqueeze(-1)).sum(dim=-2)
    recurrent_state[index] = state.transpose(-1, -2).to(recurrent_state.dtype)
    return out.to(q.dtype)


def chunk_delta_rule(
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
    """The delta rule over a flat varlen batch; reads and writes each sequence's slot in place.

    ``q, k [T, Hk, Dk]``, ``v [T, Hv, Dv]``, ``g`` float32 log-decay ``[T, Hv, Dk]`` (KDA) or ``[T, Hv]``
    (GDN), ``beta [T, Hv]``, ``recurrent_state [num_slots+1, Hv, Dv, Dk]`` (float32 or bfloat16, stored
    ``(Dv, Dk)``). A sequence starts from its slot when ``has_initial_state`` else zeros; its final
    state is written back. Returns ``o [T, Hv, Dv]`` in ``q.dtype``. ``checkpoints``: the state after
    chunk boundary ``offset`` of a sequence is also written to the checkpoint's slot, in the pool's
    dtype (float32 for KDA), and the chunk goes on (prefix-cache checkpoints at no extra step).
    """
    impl = dispatch("delta_rule", "chunk_delta_rule", q, chunk_delta_rule_ref)
    return impl(
        q, k, v, g, beta, recurrent_state, cu_seqlens, state_indices, has_initial_state,
        scale=scale, use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel, chunk_size=chunk_size,
        checkpoints=checkpoints,
    )  # fmt: skip


def fused_recurrent_delta_rule(
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
    """Decode step, one token per sequence: ``q, k [B, Hk, Dk]``, ``v [B, Hv, Dv]``, ``g [B, Hv(, Dk)]``,
    ``beta [B, Hv]``. Reads and updates each sequence's slot of ``recurrent_state`` in place; returns
    ``o [B, Hv, Dv]`` in ``q.dtype``.
    """
    impl = dispatch("delta_rule", "fused_recurrent_delta_rule", q, fused_recurrent_delta_rule_ref)
    return impl(
        q, k, v, g, beta, recurrent_state, state_indices,
        scale=scale, use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel,
    )  # fmt: skip


# ---- gates -------------------------------------------------------------------------------------


def gdn_gate_ref(a: torch.Tensor, b: torch.Tensor, A_log: torch.Tensor, dt_bias: torch.Tensor):
    """Torch reference of :func:`gdn_gate`."""
    heads = A_log.numel()
    if a.shape[-1] != heads or b.shape != a.shape or dt_bias.numel() != heads:
        raise ValueError(
            f"gdn_gate: a {tuple(a.shape)} and b {tuple(b.shape)} must be [T, Hv] with A_log and dt_bias of "
            f"Hv elements, got {A_log.numel()} and {dt_bias.numel()}"
        )
    # NOTE: softplus is linear above 20, as in fla and transformers (threshold avoids exp overflow).
    g = -torch.exp(A_log.float().reshape(heads)) * F.softplus(a.float() + dt_bias.float().reshape(heads), threshold=20.0)
    return g, torch.sigmoid(b.float())


def gdn_gate(
    a: torch.Tensor, b: torch.Tensor, A_log: torch.Tensor, dt_bias: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """GDN's per-head gate and beta, float32: ``g = -exp(A_log) * softplus(a + dt_bias)``, ``beta = sigmoid(b)``.

    ``a, b [T, Hv]`` (any row stride: views of a fused projection), ``A_log, dt_bias [Hv]``.
    """
    return dispatch("delta_rule", "gdn_gate", a, gdn_gate_ref)(a, b, A_log, dt_bias)
