"""What a model asks of the paged KV cache: one paged layout for both kinds of full-attention layer."""

from __future__ import annotations

from typing import NamedTuple

import torch

KV_KINDS = ("mla", "gqa")


class KVCacheSpec(NamedTuple):
    """Paged KV cache of a model's full-attention layers.

    The engine allocates ``kv_cache = empty([num_layers, num_blocks, block_size, entry_dim], dtype)``
    and ``bind_caches`` hands full-attention layer ``j`` the view ``kv_cache[j]``. One block manager
    serves both kinds; only the meaning of one token's entry differs:

    - ``"mla"``: the compressed latent ``[kv_lora_rank (normed) | qk_rope_head_dim]``, shared by all heads;
    - ``"gqa"``: per-head keys then values, ``[K (num_kv_heads * head_dim) | V (num_kv_heads * head_dim)]``
      (see :meth:`split_kv`).
    """

    num_layers: int
    entry_dim: int
    dtype: torch.dtype
    kind: str = "mla"
    num_kv_heads: int = 0
    head_dim: int = 0

    @classmethod
    def mla(cls, num_layers: int, kv_lora_rank: int, qk_rope_head_dim: int, dtype: torch.dtype) -> "KVCacheSpec":
        return cls(num_layers, kv_lora_rank + qk_rope_head_dim, dtype, "mla")

    @classmethod
    def gqa(cls, num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> "KVCacheSpec":
        return cls(num_layers, 2 * num_kv_heads * head_dim, dtype, "gqa", num_kv_heads, head_dim)

    @property
    def bytes_per_token(self) -> int:
        """Bytes of one token's entry in one layer."""
        return self.entry_dim * self.dtype.itemsize

    def bytes_per_block(self, block_size: int) -> int:
        """Bytes of one block over all layers."""
        return self.num_layers * block_size * self.bytes_per_token

    def check_cache(self, kv_cache: torch.Tensor | None) -> None:
        """ValueError unless ``kv_cache`` is ``[num_layers, num_blocks, block_size, entry_dim]``."""
        if (
            kv_cache is None
            or kv_cache.dim() != 4
            or kv_cache.shape[0] != self.num_layers
            or kv_cache.shape[-1] != self.entry_dim
        ):
            found = None if kv_cache is None else tuple(kv_cache.shape)
            raise ValueError(
                f"kv_cache must be [{self.num_layers}, num_blocks, block_size, {self.entry_dim}], got {found}"
            )


def split_kv(layer_cache: torch.Tensor, num_kv_heads: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Views ``(k, v)``, each ``[num_blocks, block_size, num_kv_heads, head_dim]``, of one GQA layer's cache
    ``[num_blocks, block_size, 2 * num_kv_heads * head_dim]`` (no copy)."""
    blocks, block_size, entry = layer_cache.shape
    if entry != 2 * num_kv_heads * head_dim:
        raise ValueError(f"GQA cache entry_dim {entry} != 2 x {num_kv_heads} KV heads x head_dim {head_dim}")
    kv = layer_cache.view(blocks, block_size, 2, num_kv_heads, head_dim)
    return kv[:, :, 0], kv[:, :, 1]
