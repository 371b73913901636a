"""``act(gate) * up`` in one Triton launch (SiLU; other activations through the torch reference).

Same contract as :mod:`deltaserve.ops.activation`; the product is taken in float32 and rounded once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from deltaserve.ops.activation import act_and_mul_ref


@triton.jit
def _silu_and_mul_kernel(x, out, stride_x, stride_o, N, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = cols < N
    gate = tl.load(x + row * stride_x + cols, mask=m, other=0.0).to(tl.float32)
    up = tl.load(x + row * stride_x + N + cols, mask=m, other=0.0).to(tl.float32)
    tl.store(out + row * stride_o + cols, (gate * tl.sigmoid(gate) * up).to(out.dtype.element_ty), mask=m)


def act_and_mul(x: torch.Tensor, activation: str = "silu") -> torch.Tensor:
    """See :func:`deltaserve.ops.activation.act_and_mul`."""
    if activation not in ("silu", "swish"):
        return act_and_mul_ref(x, activation)
    n = x.shape[-1] // 2
    rows = x.reshape(-1, 2 * n)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = torch.empty(rows.shape[0], n, dtype=x.dtype, device=x.device)
    if rows.shape[0]:
        block = min(1024, triton.next_power_of_2(n))
        _silu_and_mul_kernel[(rows.shape[0], triton.cdiv(n, block))](rows, out, rows.stride(0), out.stride(0), n, BLOCK=block)
    return out.view(*x.shape[:-1], n)
