"""Qwen3.5 (dense and MoE, text-only and vision-language checkpoints): Qwen3-Next's layers with split
GDN projections (``in_proj_qkv``, ``in_proj_z``, ``in_proj_b``, ``in_proj_a``).

- ``Qwen3_5ForCausalLM``: a dense MLP in every layer; ``Qwen3_5MoeForCausalLM``: MoE in every layer
  (experts per expert or fused ``gate_up_proj`` / ``down_proj``, as the releases store them).
- ``...ForConditionalGeneration``: the text model under ``model.language_model.*``, the config's
  ``text_config`` describing it; the vision tower ``model.visual.*`` is skipped (text-only serving).
"""

from __future__ import annotations

import torch
from torch import nn

from deltaserve.layers.mlp import GatedMLP
from deltaserve.layers.moe import SparseMoeBlock
from deltaserve.models.qwen3_next import MTP_NOTE, Qwen3NextForCausalLM

VISION_NOTE = "the vision tower (text-only serving)"


class Qwen3_5ForCausalLM(Qwen3NextForCausalLM):
    projection = "split"

    @staticmethod
    def make_mlp(c, layer_idx: int, dtype: torch.dtype) -> nn.Module:
        return GatedMLP(c.hidden_size, c.intermediate_size, c.hidden_act, dtype)


class Qwen3_5MoeForCausalLM(Qwen3_5ForCausalLM):
    @staticmethod
    def make_mlp(c, layer_idx: int, dtype: torch.dtype) -> nn.Module:
        return SparseMoeBlock.from_qwen_config(c, dtype)


class _VisionLanguage:
    """Mixin: the text model nested under ``model.language_model``, the vision tower skipped."""

    ignored_checkpoint_prefixes = {"mtp.": MTP_NOTE, "model.visual.": VISION_NOTE}

    def build_text_model(self, text_model: nn.Module) -> None:
        self.model = nn.Module()
        self.model.language_model = text_model

    @property
    def text_model(self) -> nn.Module:
        return self.model.language_model


class Qwen3_5ForConditionalGeneration(_VisionLanguage, Qwen3_5ForCausalLM):
    pass


class Qwen3_5MoeForConditionalGeneration(_VisionLanguage, Qwen3_5MoeForCausalLM):
    pass
