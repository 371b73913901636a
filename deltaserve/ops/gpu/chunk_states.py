"""fla's chunked delta rule with the state at every chunk boundary kept in float32.

fla-core's chunked prefill computes the recurrent state at every 64-token chunk boundary (the ``h``
of its ``chunk_gated_delta_rule_fwd_h`` kernel) but stores it in the inputs' dtype (bfloat16 for a
bfloat16 model) and returns final states only. A prefix-cache checkpoint taken inside the forward
needs the state at a boundary exactly as the recurrence continued from it, so this module runs
fla's inference pipeline itself, step by step as ``chunk_kda`` / ``chunk_gated_delta_rule`` do
(q/k L2 norm, gate cumsum, intra-chunk WY factors, the state kernel, the output kernel), with one
change: the state kernel stores into a float32 buffer. The kernel keeps its state in float32
registers and rounds only when storing, so

- the stored chunk states are the float32 states the recurrence carries on from, and
- the outputs, computed from the same states rounded to the inputs' dtype (as fla's own call
  stores them), equal fla's bit for bit, and so do the final states.

One pass, no extra launches: the price is a float32 ``h`` (twice the bytes of a bfloat16 one).
Covers what the engine calls: no gate in the kernel, no context parallelism, inference only.
"""

from __future__ import annotations

import torch
import triton
from fla.ops.common.chunk_delta_h import chunk_gated_delta_rule_fwd_kernel_h_blockdim64
from fla.ops.common.chunk_o import chunk_fwd_o
from fla.ops.gated_delta_rule.chunk_fwd import chunk_gated_delta_rule_fwd_intra
from fla.ops.gla.chunk import chunk_gla_fwd_o_gk
from fla.ops.kda.chunk_intra import chunk_kda_fwd_intra
from fla.ops.utils import chunk_local_cumsum
from fla.ops.utils.constant import RCP_LN2
from fla.ops.utils.index import prepare_chunk_indices, prepare_chunk_offsets

from deltaserve.ops.gpu.norm import l2norm


def _states_fwd(k, w, u, g, gk, initial_state, cu_seqlens, chunk_indices, chunk_size):
    """fla's state kernel over the varlen batch: ``(h [1, NT, Hv, V, K] float32, v_new, final [N, Hv, V, K])``.

    The launch of ``chunk_gated_delta_rule_fwd_h`` (V-first states, final states out) with ``h``
    allocated in float32 rather than in ``k``'s dtype.
    """
    _, T, H, K = k.shape
    V, HV = u.shape[-1], u.shape[2]
    N, NT = len(cu_seqlens) - 1, len(chunk_indices)
    h = k.new_empty(1, NT, HV, V, K, dtype=torch.float32)
    final = k.new_zeros(N, HV, V, K, dtype=torch.float32)
    v_new = torch.empty_like(u)

    def grid(meta):
        return (triton.cdiv(V, meta["BV"]) * N * HV,)

    chunk_gated_delta_rule_fwd_kernel_h_blockdim64[grid](
        k=k, v=u, w=w, v_new=v_new, g=g, gk=gk, h=h, h0=initial_state, ht=final, cu_seqlens=cu_seqlens,
        chunk_offsets=prepare_chunk_offsets(cu_seqlens, chunk_size), T=T, H=H, HV=HV, K=K, V=V, BT=chunk_size,
        STATE_V_FIRST=True,
    )  # fmt: skip
    return h, v_new, final


@torch.no_grad()
def chunk_with_states(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    *,
    head_gate: bool,
    scale: float,
    initial_state: torch.Tensor,
    cu_seqlens: torch.Tensor,
    use_qk_l2norm_in_kernel: bool,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(o [1, T, Hv, V], final [N, Hv, V, K] float32, h [1, NT, Hv, V, K] float32)`` for fla's
    batch-of-one varlen inputs (``[1, T, ...]``, ``cu_seqlens`` int64); ``h[0, c]`` is the state
    before chunk ``c`` of the flat chunk list (sequence ``b``'s chunks start at the sum of
    ``ceil(len / chunk_size)`` over the sequences before it).

    ``head_gate``: GDN's gate per value head (``g [1, T, Hv]``, GVA inside the kernels), else KDA's
    per key channel (``g [1, T, Hv, K]``, one q/k head per value head).
    """
    q, k, v, g, beta = (t.contiguous() for t in (q, k, v, g, beta))
    if use_qk_l2norm_in_kernel:
        q, k = l2norm(q), l2norm(k)
    chunk_indices = prepare_chunk_indices(cu_seqlens, chunk_size)
    g = chunk_local_cumsum(g, chunk_size=chunk_size, scale=RCP_LN2, cu_seqlens=cu_seqlens, chunk_indices=chunk_indices)
    common = dict(cu_seqlens=cu_seqlens, chunk_size=chunk_size, chunk_indices=chunk_indices)
    if head_gate:
        w, u, _ = chunk_gated_delta_rule_fwd_intra(k=k, v=v, g=g, beta=beta, **common)
        h, v_new, final = _states_fwd(k, w, u, g, None, initial_state, cu_seqlens, chunk_indices, chunk_size)
        # NOTE: fla's GDN output kernel multiplies q by h without a cast: give it h as fla's own call
        # stores it (rounded to the inputs' dtype).
        o = chunk_fwd_o(q=q, k=k, v=v_new, h=h.to(q.dtype), g=g, scale=scale, state_v_first=True, **common)
    else:
        w, u, _, kg, Aqk, _ = chunk_kda_fwd_intra(q=q, k=k, v=v, gk=g, beta=beta, scale=scale, **common)
        h, v_new, final = _states_fwd(kg, w, u, None, g, initial_state, cu_seqlens, chunk_indices, chunk_size)
        # NOTE: KDA's output kernel rounds h to q's dtype as it loads it.
        o = chunk_gla_fwd_o_gk(q=q, v=v_new, g=g, A=Aqk, h=h, scale=scale, state_v_first=True, **common)
    return o.to(q.dtype), final, h


def chunk_index(query_lens: list[int], seq: int, offset: int, chunk_size: int = 64) -> int:
    """The flat chunk index of the boundary ``offset`` tokens into sequence ``seq`` (``offset`` a
    multiple of ``chunk_size``): where :func:`chunk_with_states` keeps the state before that chunk."""
    return sum(-(-n // chunk_size) for n in query_lens[:seq]) + offset // chunk_size
