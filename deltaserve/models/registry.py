"""Model classes by ``config.architectures[0]``, imported on first use."""

from __future__ import annotations

import importlib

# architecture name -> "module:Class"
_MODELS: dict[str, str] = {
    "KimiLinearForCausalLM": "deltaserve.models.kimi_linear:KimiLinearForCausalLM",
    "Qwen3NextForCausalLM": "deltaserve.models.qwen3_next:Qwen3NextForCausalLM",
    "Qwen3_5ForCausalLM": "deltaserve.models.qwen3_5:Qwen3_5ForCausalLM",
    "Qwen3_5MoeForCausalLM": "deltaserve.models.qwen3_5:Qwen3_5MoeForCausalLM",
    "Qwen3_5ForConditionalGeneration": "deltaserve.models.qwen3_5:Qwen3_5ForConditionalGeneration",
    "Qwen3_5MoeForConditionalGeneration": "deltaserve.models.qwen3_5:Qwen3_5MoeForConditionalGeneration",
}


def supported_architectures() -> list[str]:
    return sorted(_MODELS)


def architecture_of(hf_config_or_dict) -> str:
    """``architectures[0]`` of a transformers config or a config.json dict; ValueError when absent."""
    archs = (
        hf_config_or_dict.get("architectures")
        if isinstance(hf_config_or_dict, dict)
        else getattr(hf_config_or_dict, "architectures", None)
    )
    if not archs or not isinstance(archs, (list, tuple)):
        raise ValueError(f"config has no 'architectures' list; supported architectures: {supported_architectures()}")
    return archs[0]


def resolve_name(architecture: str) -> type:
    """The model class of an architecture name; ValueError listing the supported ones when unknown."""
    if architecture not in _MODELS:
        raise ValueError(
            f"unsupported architecture {architecture!r}; supported architectures: {supported_architectures()}"
        )
    module, name = _MODELS[architecture].split(":")
    return getattr(importlib.import_module(module), name)


def resolve(hf_config) -> type:
    """The model class for ``hf_config.architectures[0]``."""
    return resolve_name(architecture_of(hf_config))
