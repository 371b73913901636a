"""A derived tensor (such as KDA's fused conv weight) follows its parameters."""

from __future__ import annotations

import torch
from torch import nn

from helpers_model import make_checkpoint

from deltaserve.layers.derived import DerivedTensor
from deltaserve.layers.kda import KimiDeltaAttention
from deltaserve.models.loader import load_model, load_weights


def test_derived_tensor_is_recomputed_only_when_a_parameter_changes():
    layer = nn.Linear(4, 3, bias=False).to(torch.bfloat16)
    calls = []

    def to_f32(w):
        calls.append(1)
        return w.float()

    derived = DerivedTensor(to_f32)
    first = derived(layer.weight)
    assert derived(layer.weight) is first and len(calls) == 1
    new = torch.randn(3, 4).bfloat16()
    layer.load_state_dict({"weight": new})  # in place: the version changes, not the storage
    assert torch.equal(derived(layer.weight), new.float()) and len(calls) == 2
    with torch.no_grad():
        layer.weight.mul_(2)
    assert torch.equal(derived(layer.weight), (new * 2).float()) and len(calls) == 3
    layer.float()  # a cast: new storage and dtype
    assert derived(layer.weight).dtype == torch.float32 and len(calls) == 4
    assert not derived(layer.weight).requires_grad


def test_reloading_weights_refreshes_the_derived_tensors(tmp_path):
    # The loader writes through .data (no version bump of its own): it must still invalidate them.
    model = load_model(make_checkpoint(tmp_path / "a", seed=0))
    kda = next(m for m in model.modules() if isinstance(m, KimiDeltaAttention))
    before = kda.fuse_conv_weights().clone()
    load_weights(model, make_checkpoint(tmp_path / "b", seed=1))
    after = kda.fuse_conv_weights()
    convs = (kda.q_conv1d.weight, kda.k_conv1d.weight, kda.v_conv1d.weight)
    assert not torch.equal(after, before) and torch.equal(after, torch.cat([w.squeeze(1) for w in convs]))
