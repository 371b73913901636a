"""What a model asks of the paged KV cache."""

from __future__ import annotations

from typing import NamedTuple

import torch


class KVCacheSpec(NamedTuple):
    """Paged KV cache of a model's full-attention layers.

    The engine allocates ``kv_cache = empty([num_layers, num_blocks, block_size, entry_dim], dtype)``
    and hands it to ``model.bind_caches``. For MLA one entry is the compressed latent of one token,
    ``[kv_lora_rank (normed) | qk_rope_head_dim]``, shared by all heads.
    """

    num_layers: int
    entry_dim: int
    dtype: torch.dtype

    def bytes_per_block(self, block_size: int) -> int:
        """Bytes of one block over all layers."""
        return self.num_layers * block_size * self.entry_dim * self.dtype.itemsize
