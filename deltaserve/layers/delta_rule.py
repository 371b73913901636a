"""What the delta-rule token mixers (KDA, GDN) share: their two pool states, the short conv over
``q | k | v`` and the prefill/decode dispatch of the delta rule, over one flat mixed batch.

A subclass projects, computes its gate and output, and calls :meth:`short_conv` and
:meth:`delta_rule`; batch metadata comes from :func:`deltaserve.forward_context.get_forward_context`.
"""

from __future__ import annotations

import torch
from torch import nn

from deltaserve.forward_context import ForwardContext, get_forward_context
from deltaserve.ops.conv1d import causal_conv1d_fn, causal_conv1d_update
from deltaserve.ops.delta_rule import chunk_delta_rule, fused_recurrent_delta_rule
from deltaserve.state.layout import StateLayout
from deltaserve.state.pool import LayerState


class DeltaRuleMixer(nn.Module):
    """Base of a delta-rule layer: ``bind_state`` checks the pool layout against the layer's shapes."""

    def __init__(
        self,
        state_kind: str,
        conv_split: tuple[int, ...],
        recurrent_shape: tuple[int, int, int],
        conv_kernel_size: int,
        layer_idx: int,
        conv_activation: str | None = "silu",
        recurrent_dtypes: tuple[torch.dtype, ...] = (torch.float32,),
    ):
        super().__init__()
        self.state_kind = state_kind
        self.conv_split = tuple(conv_split)
        self.recurrent_shape = tuple(recurrent_shape)
        self.conv_kernel_size = conv_kernel_size
        self.layer_idx = layer_idx
        self.conv_activation = conv_activation
        self.recurrent_dtypes = recurrent_dtypes
        self.conv_state: torch.Tensor | None = None  # [slots+1, L, conv_dim], SD view of the pool
        self.recurrent_state: torch.Tensor | None = None  # [slots+1, Hv, Dv, Dk]

    def bind_state(self, layer_state: LayerState, layout: StateLayout) -> None:
        """Use this layer's pool views ``[num_slots+1, ...]``; a DS conv pool is viewed as SD."""
        expected = {
            "kind": (self.state_kind, layout.kind),
            "conv_split": (self.conv_split, tuple(layout.conv_split)),
            "conv_kernel_size": (self.conv_kernel_size, layout.conv_kernel_size),
            "recurrent_shape": (self.recurrent_shape, layout.recurrent_shape),
        }
        for field, (want, got) in expected.items():
            if want != got:
                raise ValueError(f"layer {self.layer_idx}: state layout {field} must be {want}, got {got}")
        if layout.recurrent_dtype not in self.recurrent_dtypes:
            raise ValueError(
                f"layer {self.layer_idx}: state layout recurrent_dtype must be one of {self.recurrent_dtypes}, "
                f"got {layout.recurrent_dtype}"
            )
        if layer_state.recurrent_state is None or tuple(layer_state.recurrent_state.shape[1:]) != self.recurrent_shape:
            raise ValueError(f"layer {self.layer_idx}: the pool holds no recurrent state of shape {self.recurrent_shape}")
        conv = layer_state.conv_state
        self.conv_state = conv if layout.conv_layout == "SD" else conv.transpose(-1, -2)
        self.recurrent_state = layer_state.recurrent_state

    def batch_context(self, hidden_states: torch.Tensor) -> ForwardContext:
        """The current forward context, after checking that the layer has state and the token count agrees."""
        if self.conv_state is None or self.recurrent_state is None:
            raise RuntimeError(
                f"{type(self).__name__} layer {self.layer_idx} has no state: call bind_state() before forward()"
            )
        ctx = get_forward_context()
        if hidden_states.shape[0] != ctx.num_tokens:
            raise ValueError(
                f"hidden_states has {hidden_states.shape[0]} tokens, the forward context's query_lens sum to "
                f"{ctx.num_tokens}"
            )
        return ctx

    def short_conv(self, mixed_qkv: torch.Tensor, weight: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """Causal depthwise conv of ``mixed_qkv [T, conv_dim]`` (``weight [conv_dim, K]``) over each sequence,
        reading and writing the conv states in the slots; returns ``act(conv) [T, conv_dim]``.

        In a speculative verify step the verify rows read their windows only (see ``spec_decode.verify``).
        """
        if ctx.spec_decode is not None:
            return ctx.spec_decode.conv(mixed_qkv, weight, self.conv_state, self.conv_activation)
        if ctx.is_decode_only:
            return causal_conv1d_update(mixed_qkv, weight, self.conv_state, ctx.state_indices, self.conv_activation)
        # NOTE: ctx.checkpoints: the conv windows at prefix-cache checkpoints inside the prefill, once for all kinds.
        return causal_conv1d_fn(
            mixed_qkv, weight, self.conv_state,
            ctx.cu_seqlens, ctx.state_indices, ctx.has_initial_state, self.conv_activation, ctx.checkpoints,
        )  # fmt: skip

    def split_qkv(self, mixed_qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Views ``q, k [T, Hk, Dk]`` and ``v [T, Hv, Dv]`` of the conv output, split by the layout's sizes."""
        num_v_heads, v_dim, k_dim = self.recurrent_shape
        q, k, v = mixed_qkv.split(self.conv_split, dim=-1)
        rows, num_k_heads = mixed_qkv.shape[0], self.conv_split[0] // k_dim
        return q.view(rows, num_k_heads, k_dim), k.view(rows, num_k_heads, k_dim), v.view(rows, num_v_heads, v_dim)

    def delta_rule(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        g: torch.Tensor,
        beta: torch.Tensor,
        ctx: ForwardContext,
    ) -> torch.Tensor:
        """The delta rule on the slots in place: the recurrent step when the batch is decode-only, else chunked
        (which also writes the states at the forward context's prefix-cache checkpoints).

        In a speculative verify step the verify rows read their states only and keep their inputs for the commit.
        """
        if ctx.spec_decode is not None:
            return ctx.spec_decode.delta_rule(chunk_delta_rule, (q, k, v, g, beta), self.recurrent_state)
        if ctx.is_decode_only:
            return fused_recurrent_delta_rule(q, k, v, g, beta, self.recurrent_state, ctx.state_indices)
        return chunk_delta_rule(
            q, k, v, g, beta, self.recurrent_state, ctx.cu_seqlens, ctx.state_indices, ctx.has_initial_state,
            checkpoints=ctx.checkpoints,
        )
