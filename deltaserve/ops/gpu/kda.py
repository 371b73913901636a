"""KDA's gates on the GPU: the forget gate, and with it the write strength, in one Triton launch
(the delta rule is in ``delta_rule``).

The inputs are read through their row strides, so ``f`` and ``b`` can be column views of one fused
projection; the outputs are float32 and contiguous. Same contracts as :mod:`deltaserve.ops.kda`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_T = 16  # rows a program


@triton.jit(do_not_specialize=["T"])
def _kda_gates_kernel(
    f, b, A_log, dt_bias, g, beta, T, stride_f, stride_b,
    H: tl.constexpr, D: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr, HAS_BETA: tl.constexpr,
):
    i_h = tl.program_id(1)
    rows = (tl.program_id(0) * BT + tl.arange(0, BT)).to(tl.int64)
    cols = tl.arange(0, BD)
    m_t = rows < T
    m = m_t[:, None] & (cols < D)[None, :]
    x = tl.load(f + rows[:, None] * stride_f + i_h * D + cols[None, :], mask=m, other=0.0).to(tl.float32)
    x += tl.load(dt_bias + i_h * D + cols, mask=cols < D, other=0.0).to(tl.float32)[None, :]
    # NOTE: softplus linear above 20, as the reference (and fla) has it
    softplus = tl.where(x < 20.0, tl.log(1.0 + tl.exp(x)), x)
    decay = tl.exp(tl.load(A_log + i_h).to(tl.float32))
    tl.store(g + rows[:, None] * (H * D) + i_h * D + cols[None, :], -decay * softplus, mask=m)
    if HAS_BETA:
        logit = tl.load(b + rows * stride_b + i_h, mask=m_t, other=0.0).to(tl.float32)
        tl.store(beta + rows * H + i_h, tl.sigmoid(logit), mask=m_t)


def _gates(f: torch.Tensor, b: torch.Tensor | None, A_log: torch.Tensor, dt_bias: torch.Tensor):
    heads = A_log.numel()  # NOTE: the shapes are checked by the public ops
    rows = f.reshape(-1, f.shape[-1])
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    num_tokens, dim = rows.shape[0], rows.shape[1] // heads
    g = torch.empty(*f.shape[:-1], heads, dim, dtype=torch.float32, device=f.device)
    beta = None
    if b is not None:
        b = b.reshape(-1, heads)
        if b.stride(-1) != 1:
            b = b.contiguous()
        beta = torch.empty(*f.shape[:-1], heads, dtype=torch.float32, device=f.device)
    if num_tokens:
        _kda_gates_kernel[(triton.cdiv(num_tokens, BLOCK_T), heads)](
            rows, b if b is not None else rows, A_log.reshape(-1), dt_bias.reshape(-1), g,
            beta if beta is not None else g, num_tokens, rows.stride(0), b.stride(0) if b is not None else 0,
            H=heads, D=dim, BT=BLOCK_T, BD=triton.next_power_of_2(dim), HAS_BETA=b is not None,
        )  # fmt: skip
    return g, beta


def kda_gate(f: torch.Tensor, A_log: torch.Tensor, dt_bias: torch.Tensor) -> torch.Tensor:
    """See :func:`deltaserve.ops.kda.kda_gate`."""
    return _gates(f, None, A_log, dt_bias)[0]


def kda_gates(
    f: torch.Tensor, b: torch.Tensor, A_log: torch.Tensor, dt_bias: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """See :func:`deltaserve.ops.kda.kda_gates`."""
    return _gates(f, b, A_log, dt_bias)
