"""KDA's forget gate on the GPU through fla-core's fused gate kernel (the delta rule is in ``delta_rule``)."""

from __future__ import annotations

import torch
from fla.ops.kda.gate import kda_gate_fwd as fla_kda_gate_fwd

from deltaserve.ops.kda import check_gate_shapes


def kda_gate(f: torch.Tensor, A_log: torch.Tensor, dt_bias: torch.Tensor) -> torch.Tensor:
    """``g [T, H, K]`` float32 ``= -exp(A_log) * softplus(f + dt_bias)`` through fla's fused gate kernel."""
    heads = check_gate_shapes(f, A_log, dt_bias)
    gate = f.reshape(*f.shape[:-1], heads, f.shape[-1] // heads).contiguous()
    return fla_kda_gate_fwd(gate, A_log.reshape(heads).contiguous(), dt_bias.reshape(-1).contiguous(),
                            output_dtype=torch.float32)
