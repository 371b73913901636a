"""RMSNorm, sigmoid- or SiLU-gated RMSNorm and the L2 norm of q/k on the GPU through fla-core's fused
Triton norm kernels (forward only).

Same contract as :mod:`deltaserve.ops.norm`: float32 statistics and arithmetic, output in ``x.dtype``.

fla's wrappers autotune the kernels for rows of up to 512 channels on ``NB = ceil(rows / 2048)``
(``/ 65536`` for the gated and L2 norms), a constexpr: every new bucket of a step's token count
compiles and autotunes the kernel again, in the middle of serving (on an H200 a 14k-token step
stalled 16 s on it, a 16k-token one 32 s). ``NB`` takes no part in the arithmetic, so for those
rows the kernels are called here with two buckets of the project's own (:func:`tuning_bucket`:
decode-sized and prefill-sized), both of which the engine's warm-up reaches.
"""

from __future__ import annotations

import torch
import triton
from fla.modules.norm.fused_norm_gate import layer_norm_gated_fwd, layer_norm_gated_fwd_kernel
from fla.modules.norm.l2norm import l2norm_fwd, l2norm_fwd_kernel
from fla.modules.norm.layernorm import layer_norm_fwd, layer_norm_fwd_kernel

# Rows of at most this many channels take fla's tiled kernels (autotuned on NB); wider ones its row kernels.
TILED_MAX_DIM = 512
DECODE_ROWS = 65536


def tuning_bucket(rows: int) -> int:
    """The autotuning bucket of a norm over ``rows`` rows: 1 up to :data:`DECODE_ROWS` (every decode and
    verify batch), else 2."""
    return 1 if rows <= DECODE_ROWS else 2


def _rows(x: torch.Tensor) -> torch.Tensor:
    # fla's kernels address rows as row * D: [N, D] contiguous.
    return x.reshape(-1, x.shape[-1]).contiguous()


def _tiled(rows: int):
    return lambda meta: (triton.cdiv(rows, meta["BT"]),)


def _rms_rows(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """fla's RMSNorm of ``x [N, D]`` (plus ``residual``, whose sum it returns too)."""
    n, d = x.shape
    if d > TILED_MAX_DIM:
        y, _, _, summed = layer_norm_fwd(x, weight, None, eps, residual=residual, is_rms_norm=True)
        return y, summed
    y = torch.empty_like(x)
    summed = None if residual is None else torch.empty_like(residual)
    rstd = torch.empty(n, dtype=torch.float32, device=x.device)
    layer_norm_fwd_kernel[_tiled(n)](
        x=x, y=y, w=weight, b=None, res=residual, res_out=summed, mean=None, rstd=rstd, eps=eps, T=n, G=1, D=d,
        BD=triton.next_power_of_2(d), NB=tuning_bucket(n), IS_RMS_NORM=True, HAS_RESIDUAL=residual is not None,
        STORE_RESIDUAL_OUT=summed is not None, HAS_WEIGHT=True, HAS_BIAS=False,
    )  # fmt: skip
    return y, summed


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``x / sqrt(sum(x^2) + eps)`` over the last dim (fla's L2 norm of q and k), in ``x.dtype``, contiguous."""
    rows = _rows(x)
    n, d = rows.shape
    if d > TILED_MAX_DIM:
        return l2norm_fwd(x, eps)[0]
    y = torch.empty_like(rows)
    rstd = torch.empty(n, dtype=torch.float32, device=x.device)
    l2norm_fwd_kernel[_tiled(n)](
        x=rows, y=y, rstd=rstd, eps=eps, T=n, D=d, BD=triton.next_power_of_2(d), NB=tuning_bucket(n)
    )
    return y.view(x.shape)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * RMSNorm(x)`` over the last dim, one launch; returns ``x.dtype``."""
    return _rms_rows(_rows(x), weight, eps)[0].view(x.shape)


def zero_centered_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``(1 + weight) * RMSNorm(x)``, float32 throughout, one norm launch; returns ``x.dtype``."""
    return _rms_rows(_rows(x), 1.0 + weight.float(), eps)[0].view(x.shape)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weight * RMSNorm(x + residual), x + residual)``, one launch; the sum in float32, stored in ``residual.dtype``."""
    y, summed = _rms_rows(_rows(x), weight, eps, _rows(residual))
    return y.view(x.shape), summed.view(x.shape)


def add_zero_centered_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``((1 + weight) * RMSNorm(x + residual), x + residual)``, as :func:`add_rms_norm`."""
    y, summed = _rms_rows(_rows(x), 1.0 + weight.float(), eps, _rows(residual))
    return y.view(x.shape), summed.view(x.shape)


def gated_rms_norm(
    x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float, activation: str = "sigmoid"
) -> torch.Tensor:
    """``RMSNorm(x) * weight * act(gate)`` (sigmoid or SiLU) over the last dim, one launch; returns ``x.dtype``."""
    if gate.shape != x.shape:
        gate = gate.reshape(x.shape)
    # fla names SiLU "swish"
    fla_activation = "swish" if activation == "silu" else activation
    rows, gates = _rows(x), _rows(gate)
    n, d = rows.shape
    if d > TILED_MAX_DIM:
        y, _, _, _ = layer_norm_gated_fwd(rows, gates, weight, None, activation=fla_activation, eps=eps, is_rms_norm=True)
        return y.view(x.shape)
    y = torch.empty_like(rows)
    rstd = torch.empty(n, dtype=torch.float32, device=x.device)
    layer_norm_gated_fwd_kernel[_tiled(n)](
        x=rows, g=gates, y=y, w=weight, b=None, residual=None, residual_out=None, mean=None, rstd=rstd, eps=eps,
        T=n, D=d, BD=triton.next_power_of_2(d), NB=tuning_bucket(n), ACTIVATION=fla_activation, IS_RMS_NORM=True,
    )  # fmt: skip
    return y.view(x.shape)
