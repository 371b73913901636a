"""rms_norm / gated_rms_norm and their modules vs transformers' KimiLinearRMSNorm / KimiLinearRMSNormGated / Qwen3NextRMSNormGated."""

from __future__ import annotations

import pytest
import torch
from conftest import rel_err
from transformers.models.kimi_linear.modeling_kimi_linear import KimiLinearRMSNorm, KimiLinearRMSNormGated
from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextRMSNormGated

from deltaserve.layers.norm import GatedRMSNorm, RMSNorm
from deltaserve.ops.norm import gated_rms_norm, rms_norm

EPS = 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_matches_transformers(dtype):
    ref = KimiLinearRMSNorm(48, eps=EPS).to(dtype)
    with torch.no_grad():
        ref.weight.copy_(1 + 0.3 * torch.randn(48))
    x = (5 * torch.randn(7, 48)).to(dtype)
    y = rms_norm(x, ref.weight, EPS)
    expected = ref(x)
    assert y.dtype == dtype
    assert rel_err(y, expected) < (1e-6 if dtype == torch.float32 else 1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gated_rms_norm_matches_transformers_per_head(dtype):
    ref = KimiLinearRMSNormGated(16, eps=EPS)
    with torch.no_grad():
        ref.weight.copy_(1 + 0.3 * torch.randn(16))
    x, gate = (3 * torch.randn(5, 4, 16)).to(dtype), (2 * torch.randn(5, 4, 16)).to(dtype)
    y = gated_rms_norm(x, gate, ref.weight, EPS)
    assert y.dtype == dtype
    # both compute in float32 and round once to dtype
    assert rel_err(y, ref(x, gate)) < (1e-6 if dtype == torch.float32 else 1e-3)


def test_rms_norm_module_adds_residual_first():
    norm = RMSNorm(32, eps=EPS)
    x, residual = torch.randn(3, 32), torch.randn(3, 32)
    y, new_residual = norm(x, residual)
    ref = KimiLinearRMSNorm(32, eps=EPS)
    assert torch.equal(new_residual, x + residual)
    assert rel_err(y, ref(x + residual)) < 1e-6


def test_norm_modules_name_their_parameter_weight():
    assert list(RMSNorm(8).state_dict()) == ["weight"]
    assert list(GatedRMSNorm(8).state_dict()) == ["weight"]


def test_silu_gated_rms_norm_matches_qwen3_next_gated_norm():
    ref = Qwen3NextRMSNormGated(16, eps=1e-6)
    with torch.no_grad():
        ref.weight.copy_(1 + 0.3 * torch.randn(16))
    x, gate = 3 * torch.randn(5, 4, 16), torch.randn(5, 4, 16)
    module = GatedRMSNorm(16, eps=1e-6, activation="silu")
    module.load_state_dict(ref.state_dict())
    expected = ref(x.reshape(-1, 16), gate.reshape(-1, 16)).reshape(x.shape)
    assert rel_err(module(x, gate), expected) < 1e-6
    with pytest.raises(ValueError, match="activation must be one of"):
        gated_rms_norm(x, gate, ref.weight, 1e-6, activation="relu")
