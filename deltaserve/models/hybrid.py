"""What every hybrid model shares: the lm head, and the plumbing between its layers and the engine's caches.

A hybrid model is a stack of decoder layers whose token mixer (``layer.mixer``) is either a linear
layer (KDA or GDN: two states in the pool group ``linear_group``) or a full-attention layer (MLA or
GQA: a view of the paged KV cache). A model file builds its layers and says which layout and which
KV-cache spec they need; :class:`HybridForCausalLM` hands the engine's pool and cache to them.
"""

from __future__ import annotations

import torch
from torch import nn

from deltaserve.distributed.parallel_state import get_tp_group
from deltaserve.kv.spec import KVCacheSpec
from deltaserve.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from deltaserve.state.layout import StateLayout
from deltaserve.state.pool import StateGroup, StatePool

LINEAR_ATTENTION = "linear_attention"
FULL_ATTENTION = "full_attention"


class HybridDecoderLayer(nn.Module):
    """Pre-norm block: token mixer, then feed-forward, each with a residual add (vLLM's fused residual).

    Subclasses build ``input_layernorm``, ``post_attention_layernorm`` and the modules behind the
    ``mixer`` and ``ffn`` properties under their checkpoint names.
    """

    @property
    def mixer(self) -> nn.Module:
        raise NotImplementedError

    @property
    def ffn(self) -> nn.Module:
        raise NotImplementedError

    def forward(
        self, positions: torch.Tensor, hidden_states: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns ``(hidden_states, residual)``; their sum is the block's output."""
        if residual is None:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        hidden_states = self.mixer(positions, hidden_states)
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        return self.ffn(hidden_states), residual


class HybridModel(nn.Module):
    """``embed_tokens``, the decoder ``layers``, the final ``norm``: ``(input_ids, positions) -> hidden``."""

    def __init__(self, vocab_size: int, hidden_size: int, layers: list[nn.Module], norm: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(vocab_size, hidden_size, dtype=dtype)
        self.layers = nn.ModuleList(layers)
        self.norm = norm

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden_states, residual = self.embed_tokens(input_ids), None
        for layer in self.layers:
            hidden_states, residual = layer(positions, hidden_states, residual)
        hidden_states, _ = self.norm(hidden_states, residual)
        return hidden_states


class HybridForCausalLM(nn.Module):
    """Base of the models the engine runs: ``forward(input_ids [T], positions [T]) -> hidden [T, hidden]``
    inside ``with forward_context(ctx)``, then ``compute_logits``.

    Subclasses set ``linear_group`` and implement ``linear_layout`` and ``kv_cache_spec``; ``text_model``
    is the module with ``layers`` (``self.model`` unless the checkpoint nests it).
    """

    linear_group: str = ""
    # Checkpoint name prefix -> why the loader skips the tensors under it.
    ignored_checkpoint_prefixes: dict[str, str] = {}

    def __init__(self, hf_config, dtype: torch.dtype):
        """``self.config`` is the text model's config (``hf_config.get_text_config()``)."""
        super().__init__()
        self.config = hf_config.get_text_config()
        self.dtype = dtype
        self.tp_size = get_tp_group().world_size  # the layers are built for this TP size
        layer_types = list(self.config.layer_types)
        bad = [(i, t) for i, t in enumerate(layer_types) if t not in (LINEAR_ATTENTION, FULL_ATTENTION)]
        if bad:
            raise ValueError(
                f"layer_types[{bad[0][0]}] = {bad[0][1]!r}; expected {LINEAR_ATTENTION!r} or {FULL_ATTENTION!r}"
            )
        self.linear_layer_ids = [i for i, t in enumerate(layer_types) if t == LINEAR_ATTENTION]
        self.attn_layer_ids = [i for i, t in enumerate(layer_types) if t == FULL_ATTENTION]

    @property
    def text_model(self) -> nn.Module:
        return self.model

    def _finish(self, hf_config) -> None:
        """Add the lm head (tied to the embedding when the config says so); eval mode, no grad."""
        c = self.config
        self.lm_head = ParallelLMHead(c.vocab_size, c.hidden_size, dtype=self.dtype)
        # NOTE: a vision-language config says whether the lm head is tied at its top level.
        tie = getattr(hf_config, "tie_word_embeddings", None)
        self.tie_word_embeddings = bool(getattr(c, "tie_word_embeddings", False) if tie is None else tie)
        self.tie_weights()
        self.requires_grad_(False)
        self.eval()

    def tie_weights(self) -> None:
        """Make the lm head share the embedding when the config ties them (again after ``to_empty()``,
        which gives each parameter its own storage)."""
        if self.tie_word_embeddings:
            self.lm_head.weight = self.text_model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.text_model(input_ids, positions)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """``[N, hidden]`` -> float32 logits ``[N, vocab]``."""
        return self.lm_head(hidden_states).float()

    # ---- caches ------------------------------------------------------------------------------

    def linear_layout(
        self, tp_size: int, cache_dtype: str | torch.dtype, num_spec: int, conv_layout: str, mamba_ssm_cache_dtype: str
    ) -> StateLayout:
        raise NotImplementedError

    def kv_cache_spec(self, cache_dtype: str | torch.dtype = "auto") -> KVCacheSpec:
        raise NotImplementedError

    def state_groups(
        self,
        tp_size: int = 1,
        cache_dtype: str | torch.dtype = "auto",
        num_spec: int = 0,
        conv_layout: str = "SD",
        mamba_ssm_cache_dtype: str = "auto",
    ) -> dict[str, StateGroup]:
        """Pool groups of the linear layers: ``{linear_group: StateGroup(layout, num_linear_layers)}``,
        empty without linear layers."""
        if not self.linear_layer_ids:
            return {}
        layout = self.linear_layout(tp_size, cache_dtype, num_spec, conv_layout, mamba_ssm_cache_dtype)
        return {self.linear_group: StateGroup(layout, len(self.linear_layer_ids))}

    def bind_caches(self, pool: StatePool | None, kv_cache: torch.Tensor | None) -> None:
        """Give every layer its views: linear layer ``k`` gets ``pool.layer_state(linear_group, k)`` and the
        group's layout, full-attention layer ``j`` gets ``kv_cache[j]`` (``kv_cache``:
        ``[num_attn_layers, num_blocks, block_size, entry_dim]``)."""
        layers = self.text_model.layers
        name = self.linear_group
        if self.linear_layer_ids:
            if pool is None or name not in pool.groups:
                raise ValueError(f"the model has {name.upper()} layers but the state pool has no {name!r} group")
            group = pool.groups[name]
            if group.num_layers != len(self.linear_layer_ids):
                raise ValueError(
                    f"pool group {name!r} has {group.num_layers} layers, the model {len(self.linear_layer_ids)}"
                )
            for k, i in enumerate(self.linear_layer_ids):
                layers[i].mixer.bind_state(pool.layer_state(name, k), group.layout)
        if self.attn_layer_ids:
            self.kv_cache_spec().check_cache(kv_cache)
            for j, i in enumerate(self.attn_layer_ids):
                layers[i].mixer.kv_cache = kv_cache[j]
