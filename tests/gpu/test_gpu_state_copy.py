"""The fused Triton state copies (all layers, many pairs) vs the torch reference copies."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

from deltaserve.ops import gpu_impl  # noqa: E402
from deltaserve.state import copy as state_copy  # noqa: E402
from deltaserve.state.layout import kda_layout, short_conv_layout  # noqa: E402
from deltaserve.state.pool import StateGroup, StatePool  # noqa: E402

NUM_SLOTS = 12


def filled_pools(conv_layout: str, num_spec: int = 0) -> tuple[StatePool, StatePool]:
    """The same random pool on the CPU and on CUDA: a KDA group and a conv-only group; slot 0 is NaN."""
    groups = {
        "kda": StateGroup(kda_layout(4, 32, num_spec=num_spec, conv_layout=conv_layout), 3),
        "conv": StateGroup(short_conv_layout(96, 4, conv_layout=conv_layout), 2),
    }
    cpu = StatePool(groups, NUM_SLOTS)
    gpu = StatePool(groups, NUM_SLOTS, device="cuda")
    for name in groups:
        for src, dst in ((cpu.conv, gpu.conv), (cpu.recurrent, gpu.recurrent)):
            if src[name] is not None:
                src[name].copy_(torch.randn(src[name].shape).to(src[name].dtype))
                src[name][:, 0] = float("nan")
                dst[name].copy_(src[name])
    return cpu, gpu


def assert_same(cpu: StatePool, gpu: StatePool) -> None:
    for name in cpu.groups:
        for a, b in ((cpu.conv, gpu.conv), (cpu.recurrent, gpu.recurrent)):
            if a[name] is not None:
                assert torch.equal(b[name].cpu().nan_to_num(1e30), a[name].nan_to_num(1e30)), name


def test_gpu_copy_is_used():
    assert gpu_impl("state_copy", "copy_slots") is not None
    assert gpu_impl("state_copy", "copy_spec_decode_states") is not None


@pytest.mark.parametrize("conv_layout", ["SD", "DS"])
@pytest.mark.parametrize("group", [None, "kda"])
def test_copy_slots_matches_torch(conv_layout, group):
    cpu, gpu = filled_pools(conv_layout)
    src, dst = [3, 7, 1, 12], [5, 2, 11, 9]
    state_copy.copy_slots_torch(cpu, torch.tensor(src), torch.tensor(dst), list(cpu.groups) if group is None else [group])
    state_copy.copy_slots(gpu, src, dst, group)
    assert_same(cpu, gpu)


@pytest.mark.parametrize("conv_layout", ["SD", "DS"])
def test_copy_spec_decode_states_matches_torch(conv_layout):
    cpu, gpu = filled_pools(conv_layout, num_spec=2)
    blocks = torch.tensor([[1, 2, 3], [4, 5, 6], [7, 8, 9]])
    dst = torch.tensor([1, 10, 9])  # request 0 publishes into its own column 0, request 2 into column 2
    accepted = torch.tensor([3, 0, 2])
    # the conv-only group has no room for speculative shifts (num_spec = 0): KDA group only
    state_copy.copy_spec_decode_states_torch(cpu, blocks, dst, accepted.clamp(min=1), ["kda"])
    state_copy.copy_spec_decode_states(gpu, blocks, dst, accepted, group="kda")
    assert_same(cpu, gpu)
