"""Mixture of experts: one block (routed experts stacked for the grouped GEMM, plus a shared expert),
two routers.

- Kimi Linear's ``block_sparse_moe`` (DeepSeek-V3 routing): ``gate.weight`` ``[E, hidden]``,
  ``gate.e_score_correction_bias`` ``[E]``, ``experts.{e}.w1|w2|w3.weight`` (w1 = gate, w3 = up,
  w2 = down), ``shared_experts.{gate,up,down}_proj.weight``.
- Qwen3-Next's and Qwen3.5's ``mlp`` (softmax routing): ``gate.weight``,
  ``experts.{e}.{gate,up,down}_proj.weight`` or the fused ``experts.gate_up_proj`` ``[E, 2I, hidden]``
  and ``experts.down_proj`` ``[E, hidden, I]``, ``shared_expert.{gate,up,down}_proj.weight`` and
  ``shared_expert_gate.weight`` ``[1, hidden]`` (the shared expert is scaled by its sigmoid).

The experts are stored stacked (``w13_weight`` ``[E, 2I, hidden]``, ``w2_weight`` ``[E, hidden, I]``);
:meth:`FusedExperts.checkpoint_weights` maps either checkpoint format into them.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from deltaserve.distributed.communication_op import tensor_model_parallel_all_reduce
from deltaserve.distributed.parallel_state import get_tp_group
from deltaserve.distributed.sharding import read_blocks, read_loaded, shard_size
from deltaserve.layers.mlp import GatedMLP
from deltaserve.ops.activation import check_activation
from deltaserve.ops.moe import fused_experts, router_logits, sigmoid_topk, softmax_topk


class TopkRouter(nn.Module):
    """Float32 logits, then :func:`deltaserve.ops.moe.sigmoid_topk` (DeepSeek-V3 routing):
    ``e_score_correction_bias`` only chooses the experts; the weights are renormalised (``renormalize``)
    and scaled by ``routed_scaling_factor``."""

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        top_k: int,
        *,
        num_expert_group: int = 1,
        topk_group: int = 1,
        renormalize: bool = True,
        routed_scaling_factor: float = 1.0,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        self.num_experts = num_experts
        self.top_k = top_k
        self.num_expert_group = num_expert_group
        self.topk_group = topk_group
        self.renormalize = renormalize
        self.routed_scaling_factor = routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size, dtype=dtype), requires_grad=False)
        # NOTE: kept in float32 whatever the model dtype: it is added to float32 scores and ties
        # between experts are decided by it.
        self.e_score_correction_bias = nn.Parameter(torch.zeros(num_experts, dtype=torch.float32), requires_grad=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x ``[T, hidden]`` -> (topk_weights float32 ``[T, k]``, topk_ids int64 ``[T, k]``)."""
        logits = router_logits(x, self.weight)
        return sigmoid_topk(
            logits, self.e_score_correction_bias, self.top_k, num_expert_group=self.num_expert_group,
            topk_group=self.topk_group, renormalize=self.renormalize, scale=self.routed_scaling_factor,
        )  # fmt: skip


class SoftmaxTopkRouter(nn.Module):
    """Qwen routing: softmax over the experts in float32, the ``top_k`` best, renormalised to sum 1
    when ``renormalize`` (``norm_topk_prob``)."""

    def __init__(
        self, hidden_size: int, num_experts: int, top_k: int, *, renormalize: bool = True,
        dtype: torch.dtype | None = None,
    ):  # fmt: skip
        super().__init__()
        self.top_k = top_k
        self.renormalize = renormalize
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size, dtype=dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x ``[T, hidden]`` -> (topk_weights float32 ``[T, k]``, topk_ids int64 ``[T, k]``)."""
        # NOTE: logits in the model dtype, softmax in float32, as transformers' Qwen3NextTopKRouter.
        return softmax_topk(torch.nn.functional.linear(x, self.weight), self.top_k, renormalize=self.renormalize)


# Checkpoint names of one expert's (gate, up, down) projections.
KIMI_EXPERT_NAMES = ("w1", "w3", "w2")
QWEN_EXPERT_NAMES = ("gate_proj", "up_proj", "down_proj")


class FusedExperts(nn.Module):
    """``E`` gated-MLP experts stored stacked: ``w13_weight`` ``[E, 2I, hidden]`` (gate rows first, then
    up), ``w2_weight`` ``[E, hidden, I]``. Under TP each rank holds ``I / tp`` intermediate channels of
    every expert, and its output is a partial sum (the block all-reduces)."""

    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        intermediate_size: int,
        hidden_act: str = "silu",
        dtype: torch.dtype | None = None,
        expert_names: tuple[str, str, str] = KIMI_EXPERT_NAMES,
    ):
        super().__init__()
        self.expert_names = expert_names
        self.num_experts = num_experts
        self.full_intermediate_size = intermediate_size
        self.tp_rank, self.tp_size = get_tp_group().rank, get_tp_group().world_size
        self.shard_start, intermediate_size = shard_size(intermediate_size, "MoE moe_intermediate_size")
        self.intermediate_size = intermediate_size
        self.w13_weight = nn.Parameter(
            torch.empty(num_experts, 2 * intermediate_size, hidden_size, dtype=dtype), requires_grad=False
        )
        self.w2_weight = nn.Parameter(
            torch.empty(num_experts, hidden_size, intermediate_size, dtype=dtype), requires_grad=False
        )
        check_activation(hidden_act)
        self.activation = hidden_act

    def checkpoint_weights(
        self, stored: Callable[[str], bool] | None = None
    ) -> dict[str, tuple[tuple[int, ...], Callable[[torch.Tensor], None]]]:
        """Checkpoint name (relative to this module) -> (expected shape, loader that copies it in place).

        Per expert (``{e}.<gate>.weight``, ...) unless ``stored("gate_up_proj")`` says the checkpoint
        holds the fused ``gate_up_proj`` / ``down_proj`` tensors (as Qwen3.5-MoE releases do).
        """
        inter, full, start = self.intermediate_size, self.full_intermediate_size, self.shard_start
        num_experts, hidden = self.num_experts, self.w2_weight.shape[1]

        def into(view_fn, dim):
            # NOTE: this rank's intermediate channels only (rows of gate/up, columns of down).
            return lambda loaded: view_fn().copy_(read_loaded(loaded, dim, start, inter))

        if stored is not None and stored("gate_up_proj"):
            w13, w2 = self.w13_weight, self.w2_weight

            def gate_up(loaded) -> None:
                # [E, gate I | up I, hidden]: this rank's share of both blocks.
                w13.data.copy_(read_blocks(loaded, [full, full], self.tp_rank, self.tp_size, dim=1))

            return {
                "gate_up_proj": ((num_experts, 2 * full, hidden), gate_up),
                "down_proj": ((num_experts, hidden, full), into(lambda: w2.data, 2)),
            }
        gate, up, down = self.expert_names
        slots = {}
        for e in range(self.num_experts):
            slots[f"{e}.{gate}.weight"] = ((full, hidden), into(lambda e=e: self.w13_weight.data[e, :inter], 0))
            slots[f"{e}.{up}.weight"] = ((full, hidden), into(lambda e=e: self.w13_weight.data[e, inter:], 0))
            slots[f"{e}.{down}.weight"] = ((hidden, full), into(lambda e=e: self.w2_weight.data[e], 1))
        return slots

    def forward(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        """x ``[T, hidden]``, topk ``[T, k]`` -> ``[T, hidden]`` (sum of weighted expert outputs)."""
        # NOTE: dispatched: a per-expert loop on the CPU, grouped GEMMs without host sync on CUDA.
        return fused_experts(x, self.w13_weight, self.w2_weight, topk_weights, topk_ids, self.activation)


class SparseMoeBlock(nn.Module):
    """Routed experts plus an optional shared expert: ``experts(x) + shared(x)``, the shared part scaled
    by ``sigmoid(shared_expert_gate(x))`` when the block has that gate (Qwen).

    The shared expert sits under the checkpoint's name (``shared_experts`` for Kimi, ``shared_expert``
    for Qwen); build with :meth:`from_kimi_config` or :meth:`from_qwen_config`.
    """

    def __init__(
        self,
        gate: nn.Module,
        experts: FusedExperts,
        shared: GatedMLP | None = None,
        *,
        shared_name: str = "shared_experts",
        shared_expert_gate: nn.Linear | None = None,
    ):
        super().__init__()
        self.gate = gate
        self.experts = experts
        self.shared_name = shared_name
        if shared is not None:
            self.add_module(shared_name, shared)
        self.shared_expert_gate = shared_expert_gate
        self.tp_size = get_tp_group().world_size

    @classmethod
    def from_kimi_config(cls, hf_config, dtype: torch.dtype | None = None) -> "SparseMoeBlock":
        c = hf_config
        activation = getattr(c, "moe_router_activation_func", "sigmoid")
        if activation != "sigmoid":
            raise NotImplementedError(f"moe_router_activation_func {activation!r}: only 'sigmoid' is supported")
        gate = TopkRouter(
            c.hidden_size,
            c.num_experts,
            c.num_experts_per_tok,
            num_expert_group=c.n_group or 1,
            topk_group=c.topk_group or 1,
            renormalize=c.norm_topk_prob,
            routed_scaling_factor=c.routed_scaling_factor,
            dtype=dtype,
        )
        experts = FusedExperts(c.num_experts, c.hidden_size, c.moe_intermediate_size, c.hidden_act, dtype)
        num_shared = c.n_shared_experts or 0
        if not num_shared:
            return cls(gate, experts)
        # NOTE: routed and shared partial sums are added first, then all-reduced once (forward).
        shared = GatedMLP(c.hidden_size, c.moe_intermediate_size * num_shared, c.hidden_act, dtype, reduce_results=False)
        return cls(gate, experts, shared)

    @classmethod
    def from_qwen_config(cls, hf_config, dtype: torch.dtype | None = None) -> "SparseMoeBlock":
        """Qwen3-Next / Qwen3.5-MoE; ``norm_topk_prob`` absent (Qwen3.5) means renormalise."""
        c = hf_config
        gate = SoftmaxTopkRouter(
            c.hidden_size, c.num_experts, c.num_experts_per_tok,
            renormalize=getattr(c, "norm_topk_prob", True), dtype=dtype,
        )  # fmt: skip
        experts = FusedExperts(
            c.num_experts, c.hidden_size, c.moe_intermediate_size, c.hidden_act, dtype, expert_names=QWEN_EXPERT_NAMES
        )
        inter = getattr(c, "shared_expert_intermediate_size", 0) or 0
        if not inter:
            return cls(gate, experts)
        shared = GatedMLP(c.hidden_size, inter, c.hidden_act, dtype, reduce_results=False)
        # NOTE: replicated; sigmoid(gate) scales this rank's partial shared output, which stays linear.
        shared_gate = nn.Linear(c.hidden_size, 1, bias=False, dtype=dtype)
        return cls(gate, experts, shared, shared_name="shared_expert", shared_expert_gate=shared_gate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        topk_weights, topk_ids = self.gate(x)
        out = self.experts(x, topk_weights, topk_ids)
        shared = getattr(self, self.shared_name, None)
        if shared is not None:
            shared_out = shared(x)
            if self.shared_expert_gate is not None:
                shared_out = torch.sigmoid(self.shared_expert_gate(x)) * shared_out
            out = out + shared_out
        return tensor_model_parallel_all_reduce(out) if self.tp_size > 1 else out
