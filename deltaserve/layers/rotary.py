"""Rotary position embedding on the first ``rotary_dim`` channels of each head (NeoX halves layout).

Qwen3-Next rotates ``head_dim * partial_rotary_factor`` channels. Qwen3.5's interleaved mRoPE gives
each frequency a temporal, height or width position; for text all three are the token position, so
it is this same rotation (checked against transformers in the tests).
"""

from __future__ import annotations

import torch
from torch import nn


class PartialRotaryEmbedding(nn.Module):
    """``forward(positions [T], q [T, H, D], k [T, Hkv, D]) -> (q, k)`` rotated, in their dtypes."""

    def __init__(self, head_dim: int, rotary_dim: int, rope_theta: float):
        super().__init__()
        if rotary_dim % 2 != 0 or not 0 < rotary_dim <= head_dim:
            raise ValueError(f"rotary dim {rotary_dim} must be even and in 2..head_dim {head_dim}")
        self.rotary_dim = rotary_dim
        self.rope_theta = float(rope_theta)
        # NOTE: a plain attribute per device, not a buffer: models are built on the meta device and
        # given uninitialised storage, which would leave a non-persistent buffer as garbage.
        self._inv_freq: dict[torch.device, torch.Tensor] = {}

    def inv_freq(self, device: torch.device) -> torch.Tensor:
        if device not in self._inv_freq:
            exponents = torch.arange(0, self.rotary_dim, 2, dtype=torch.float32) / self.rotary_dim
            self._inv_freq[device] = (1.0 / self.rope_theta**exponents).to(device)
        return self._inv_freq[device]

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        rot, rest = x[..., : self.rotary_dim].float(), x[..., self.rotary_dim :]
        x1, x2 = rot.chunk(2, dim=-1)
        rotated = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
        return torch.cat([rotated.to(x.dtype), rest], dim=-1)

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[:, None] * self.inv_freq(positions.device)  # [T, rotary_dim / 2]
        cos, sin = freqs.cos()[:, None, :], freqs.sin()[:, None, :]
        return self._rotate(q, cos, sin), self._rotate(k, cos, sin)

    def extra_repr(self) -> str:
        return f"rotary_dim={self.rotary_dim}, rope_theta={self.rope_theta}"
