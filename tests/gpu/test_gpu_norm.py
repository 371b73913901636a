"""fla-core's fused RMSNorm / sigmoid-gated RMSNorm (the GPU path) vs the torch reference."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)
pytest.importorskip("fla")

from conftest import rel_err  # noqa: E402

from deltaserve.ops import gpu_impl  # noqa: E402
from deltaserve.ops.norm import (  # noqa: E402
    add_rms_norm,
    add_rms_norm_ref,
    add_zero_centered_rms_norm,
    add_zero_centered_rms_norm_ref,
    gated_rms_norm,
    gated_rms_norm_ref,
    rms_norm,
    rms_norm_ref,
    zero_centered_rms_norm,
    zero_centered_rms_norm_ref,
)


def test_gpu_dispatch_is_used():
    assert gpu_impl("norm", "rms_norm") is not None
    assert gpu_impl("norm", "gated_rms_norm") is not None
    assert gpu_impl("norm", "zero_centered_rms_norm") is not None
    assert gpu_impl("norm", "add_rms_norm") is not None
    assert gpu_impl("norm", "add_zero_centered_rms_norm") is not None


@pytest.mark.parametrize("dtype, bound", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("shape", [(37, 2048), (29, 16, 256)], ids=["hidden", "per_head"])
def test_zero_centered_rms_norm_matches_reference(dtype, bound, shape):
    # Qwen's norms: (1 + w) * RMSNorm(x); per head for q_norm / k_norm on a non-contiguous split view
    x = (3 * torch.randn(*shape[:-1], 2 * shape[-1])).to(dtype)[..., : shape[-1]]
    weight = (0.1 * torch.randn(shape[-1])).to(dtype)
    out = zero_centered_rms_norm(x.cuda(), weight.cuda(), 1e-6)
    assert out.dtype == dtype and out.shape == x.shape
    assert rel_err(out.cpu(), zero_centered_rms_norm_ref(x, weight, 1e-6)) < bound


@pytest.mark.parametrize("dtype, bound", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("dim", [128, 2304])
def test_rms_norm_matches_reference(dtype, bound, dim):
    x = (3 * torch.randn(37, dim)).to(dtype)
    weight = (1 + 0.1 * torch.randn(dim)).to(dtype)
    out = rms_norm(x.cuda(), weight.cuda(), 1e-6)
    assert out.dtype == dtype and out.shape == x.shape
    assert rel_err(out.cpu(), rms_norm_ref(x, weight, 1e-6)) < bound


@pytest.mark.parametrize("activation", ["sigmoid", "silu"])
@pytest.mark.parametrize("dtype, bound", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_gated_rms_norm_matches_reference_per_head(dtype, bound, activation):
    # KDA's (sigmoid) and GDN's (SiLU) output norm: o [T, H, D] normalised per head, gate [T, H, D]
    x = torch.randn(29, 4, 128).to(dtype)
    gate = torch.randn(29, 4, 128).to(dtype)
    weight = (1 + 0.1 * torch.randn(128)).float()
    out = gated_rms_norm(x.cuda(), gate.cuda(), weight.cuda(), 1e-5, activation)
    assert out.dtype == dtype and out.shape == x.shape
    assert rel_err(out.cpu(), gated_rms_norm_ref(x, gate, weight, 1e-5, activation)) < bound


@pytest.mark.parametrize("fused, ref", [(add_rms_norm, add_rms_norm_ref),
                                        (add_zero_centered_rms_norm, add_zero_centered_rms_norm_ref)],
                         ids=["kimi", "zero_centered"])
@pytest.mark.parametrize("dtype, bound", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_residual_add_and_norm_match_reference(fused, ref, dtype, bound):
    # The pre-norm block's residual add fused into the norm: both the normed output and the new residual.
    x, residual = (3 * torch.randn(37, 2304)).to(dtype), (3 * torch.randn(37, 2304)).to(dtype)
    weight = (0.1 * torch.randn(2304)).to(dtype)
    out, summed = fused(x.cuda(), residual.cuda(), weight.cuda(), 1e-6)
    expected_out, expected_sum = ref(x, residual, weight, 1e-6)
    assert out.dtype == dtype and summed.dtype == dtype and out.shape == x.shape
    assert rel_err(summed.cpu(), expected_sum) < bound / 10
    assert rel_err(out.cpu(), expected_out) < bound
