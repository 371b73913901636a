"""The one-kernel KDA decode step vs the composed torch references (conv update, gate, recurrent, gated norm)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

from conftest import rel_err  # noqa: E402

from deltaserve.ops.conv1d import causal_conv1d_update_ref  # noqa: E402
from deltaserve.ops.gpu.kda_decode import kda_decode_step  # noqa: E402
from deltaserve.ops.delta_rule import fused_recurrent_delta_rule_ref  # noqa: E402
from deltaserve.ops.kda import kda_gate_ref  # noqa: E402
from deltaserve.ops.norm import gated_rms_norm_ref  # noqa: E402

H, K, V, KERNEL, NUM_SLOTS = 4, 128, 128, 4, 8
CONV_DIM = 2 * H * K + H * V


def composed_reference(proj, conv_w, conv_view, f, beta, gate, rec, index, A_log, dt_bias, norm_w):
    x = causal_conv1d_update_ref(proj, conv_w, conv_view, index)
    batch = proj.shape[0]
    q = x[:, : H * K].reshape(batch, H, K)
    k = x[:, H * K : 2 * H * K].reshape(batch, H, K)
    v = x[:, 2 * H * K :].reshape(batch, H, V)
    o = fused_recurrent_delta_rule_ref(q, k, v, kda_gate_ref(f, A_log, dt_bias), beta, rec, index)
    return gated_rms_norm_ref(o, gate.view(batch, H, V), norm_w, 1e-5)


@pytest.mark.parametrize("orientation, state_len", [("SD", 3), ("DS", 3), ("SD", 5)])
@pytest.mark.parametrize("dtype, bound", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("block_v", [16, 32])
def test_decode_step_matches_composed_references(orientation, state_len, dtype, bound, block_v):
    slots = [6, 2, 4, 1, 8]
    batch = len(slots)
    index = torch.tensor(slots, dtype=torch.int32)
    shape = (NUM_SLOTS + 1, state_len, CONV_DIM) if orientation == "SD" else (NUM_SLOTS + 1, CONV_DIM, state_len)
    conv = torch.full(shape, float("nan"), dtype=dtype)
    conv_view = conv if orientation == "SD" else conv.transpose(-1, -2)
    rec = torch.full((NUM_SLOTS + 1, H, V, K), float("nan"))
    for slot in slots:
        conv_view[slot] = torch.randn(state_len, CONV_DIM).to(dtype)
        rec[slot] = 0.05 * torch.randn(H, V, K)
    proj = torch.randn(batch, CONV_DIM + H * K).to(dtype)[:, : CONV_DIM]  # a slice of a wider projection
    conv_w = (torch.randn(CONV_DIM, KERNEL) / 2).to(dtype)
    f = torch.randn(batch, H * K).to(dtype)
    beta = torch.rand(batch, H).to(dtype)
    gate = torch.randn(batch, H * V).to(dtype)
    A_log = torch.empty(H).uniform_(1, 16).log()
    dt_bias = torch.randn(H * K) - 2
    norm_w = 1 + 0.1 * torch.randn(V)

    gpu_conv, gpu_rec = conv.cuda(), rec.cuda()
    gpu_view = gpu_conv if orientation == "SD" else gpu_conv.transpose(-1, -2)
    out = kda_decode_step(
        proj.cuda(), conv_w.cuda(), gpu_view, f.cuda(), beta.cuda(), gate.cuda(), gpu_rec, index.cuda(),
        A_log.cuda(), dt_bias.cuda(), norm_w.cuda(), 1e-5, num_heads=H, block_v=block_v,
    )
    expected = composed_reference(proj, conv_w, conv_view, f, beta, gate, rec, index, A_log, dt_bias, norm_w)
    assert out.dtype == dtype and out.shape == (batch, H, V)
    assert rel_err(out.cpu(), expected) < bound
    # conv windows are copies of inputs: exact; sentinel (NaN) slots untouched in both pools
    assert torch.equal(gpu_conv.cpu().nan_to_num(1e30), conv.nan_to_num(1e30))
    assert rel_err(gpu_rec[slots].cpu(), rec[slots]) < (1e-5 if dtype == torch.float32 else 1e-2)
    untouched = [s for s in range(NUM_SLOTS + 1) if s not in slots]
    assert gpu_rec[untouched].isnan().all()
