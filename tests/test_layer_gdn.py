"""GatedDeltaNet on a flat mixed batch and a state pool vs transformers' Qwen3-Next (qkvz) and Qwen3.5 (split)
GatedDeltaNet per sequence, each with its own cache: outputs and the conv and recurrent states left in the pool."""

from __future__ import annotations

import pytest
import torch
from conftest import rel_err
from helpers_layer import (CachedReference, assert_untouched, check_decode_steps, check_mixed_batch, check_slot,
                           linear_calls, nan_pool, run_layer, slot_states)  # fmt: skip
from transformers import Qwen3_5TextConfig, Qwen3NextConfig
from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5GatedDeltaNet
from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextGatedDeltaNet

from deltaserve.layers.gdn import GatedDeltaNet
from deltaserve.state.layout import gdn_layout
from deltaserve.state.pool import StateGroup, StatePool

HIDDEN, HK, HV, DK, DV, K = 32, 2, 4, 16, 8, 4
CONV_DIM = 2 * HK * DK + HV * DV
BOUND = 1e-5
PROJECTIONS = {"qkvz": (Qwen3NextConfig, Qwen3NextGatedDeltaNet), "split": (Qwen3_5TextConfig, Qwen3_5GatedDeltaNet)}


def tiny_config(projection: str):
    config_class, _ = PROJECTIONS[projection]
    return config_class(
        hidden_size=HIDDEN, num_hidden_layers=2, layer_types=["linear_attention", "full_attention"],
        linear_num_key_heads=HK, linear_num_value_heads=HV, linear_key_head_dim=DK, linear_value_head_dim=DV,
        linear_conv_kernel_dim=K, num_attention_heads=2, num_key_value_heads=1, head_dim=16, vocab_size=64,
        rms_norm_eps=1e-6,
    )  # fmt: skip


@pytest.fixture(scope="module", params=list(PROJECTIONS))
def layers(request):
    """transformers' layer with non-trivial random weights, ours loaded from its state dict (the checkpoint names)."""
    torch.manual_seed(1)
    config = tiny_config(request.param)
    ref = PROJECTIONS[request.param][1](config, layer_idx=0).eval()
    with torch.no_grad():
        ref.conv1d.weight.normal_(0, 0.5)
        ref.A_log.copy_(torch.empty(HV).uniform_(0.01, 16).log())
        ref.dt_bias.normal_()
        ref.norm.weight.copy_(1 + 0.2 * torch.randn(DV))
    ours = GatedDeltaNet.from_config(config, layer_idx=0, projection=request.param).eval()
    ours.load_state_dict(ref.state_dict())
    return ref, ours, config


def make_pool(num_spec: int = 0, conv_layout: str = "SD", ssm_dtype="float32") -> StatePool:
    layout = gdn_layout(HK, HV, DK, DV, conv_kernel_size=K, num_spec=num_spec, conv_layout=conv_layout,
                        model_dtype=torch.float32, ssm_dtype=ssm_dtype)  # fmt: skip
    return nan_pool("gdn", layout)


def bind(ours: GatedDeltaNet, pool: StatePool) -> None:
    ours.bind_state(pool.layer_state("gdn", 0), pool.groups["gdn"].layout)


def reference_conv_inputs(ref, x: torch.Tensor) -> torch.Tensor:
    """``[T, conv_dim]``: transformers' q|k|v conv inputs of ``x [T, hidden]``."""
    with torch.no_grad():
        if hasattr(ref, "in_proj_qkvz"):
            q, k, v, *_ = ref.fix_query_key_value_ordering(ref.in_proj_qkvz(x[None]), ref.in_proj_ba(x[None]))
            return torch.cat([t.reshape(1, len(x), -1) for t in (q, k, v)], dim=-1)[0]
        return ref.in_proj_qkv(x[None])[0]


def test_state_dict_names_and_shapes_are_the_checkpoints(layers):
    ref, _, config = layers
    projection = "qkvz" if hasattr(ref, "in_proj_qkvz") else "split"
    layer = GatedDeltaNet.from_config(config, layer_idx=0, dtype=torch.bfloat16, projection=projection)
    shapes = {name: tuple(t.shape) for name, t in layer.state_dict().items()}
    assert shapes == {name: tuple(t.shape) for name, t in ref.state_dict().items()}
    assert shapes["conv1d.weight"] == (CONV_DIM, 1, K) and shapes["A_log"] == shapes["dt_bias"] == (HV,)
    assert layer.A_log.dtype == layer.dt_bias.dtype == layer.norm.weight.dtype == torch.float32
    assert layer.conv1d.weight.dtype == layer.out_proj.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("conv_layout", ["SD", "DS"])
def test_prefill_batch_matches_transformers_per_sequence(layers, conv_layout):
    ref, ours, config = layers
    pool = make_pool(conv_layout=conv_layout)
    bind(ours, pool)
    lengths, slots = [5, 1, 70], pool.allocate(3)
    hidden = [torch.randn(n, HIDDEN) for n in lengths]
    out = run_layer(ours, hidden, lengths, [0, 0, 0], slots).split(lengths)
    for b, slot in enumerate(slots):
        reference = CachedReference(ref, config, K, "cache")
        check_slot(out[b], reference(hidden[b]), pool, "gdn", slot, reference, f"sequence {b}")
    assert_untouched(pool, "gdn", slots)


@pytest.mark.parametrize("conv_layout", ["SD", "DS"])
def test_mixed_batch_prefill_continuation_and_decode_in_one_forward(layers, conv_layout):
    ref, ours, config = layers
    pool = make_pool(conv_layout=conv_layout)
    bind(ours, pool)
    check_mixed_batch(ours, pool, "gdn", lambda: CachedReference(ref, config, K, "cache"), HIDDEN)


@pytest.mark.parametrize("conv_layout", ["SD", "DS"])
def test_decode_only_steps_match_transformers_decode(layers, conv_layout):
    ref, ours, config = layers
    pool = make_pool(conv_layout=conv_layout)
    bind(ours, pool)
    check_decode_steps(ours, pool, "gdn", lambda: CachedReference(ref, config, K, "cache"), HIDDEN)


def test_two_prefill_chunks_equal_one(layers):
    ref, ours, config = layers
    pool = make_pool()
    bind(ours, pool)
    slot = pool.allocate(1)
    hidden = torch.randn(50, HIDDEN)
    first = run_layer(ours, [hidden[:23]], [23], [0], slot)
    second = run_layer(ours, [hidden[23:]], [27], [23], slot)
    reference = CachedReference(ref, config, K, "cache")
    check_slot(torch.cat([first, second]), reference(hidden), pool, "gdn", slot[0], reference, "two chunks")


def test_spec_layout_conv_state_keeps_last_state_len_inputs(layers):
    ref, ours, _ = layers
    num_spec = 2
    state_len = K - 1 + num_spec
    pool = make_pool(num_spec=num_spec, conv_layout="DS")
    bind(ours, pool)
    lengths, slots = [2, 9], pool.allocate(2)
    hidden = [torch.randn(n, HIDDEN) for n in lengths]
    run_layer(ours, hidden, lengths, [0, 0], slots)
    step = [torch.randn(1, HIDDEN) for _ in slots]
    run_layer(ours, step, [1, 1], lengths, slots)
    for b, slot in enumerate(slots):
        inputs = reference_conv_inputs(ref, torch.cat([hidden[b], step[b]]))
        expected = torch.cat([torch.zeros(state_len, CONV_DIM), inputs])[-state_len:]
        assert rel_err(slot_states(pool, "gdn", slot)[0], expected) < BOUND


def test_projection_gathers_q_k_v_as_transformers_orders_them(layers):
    ref, ours, _ = layers
    x = torch.randn(3, HIDDEN)
    with torch.no_grad():
        mixed_qkv, z, b, a = ours.project(x)
        if hasattr(ref, "in_proj_qkvz"):
            *_, z_ref, b_ref, a_ref = ref.fix_query_key_value_ordering(ref.in_proj_qkvz(x[None]), ref.in_proj_ba(x[None]))
        else:
            z_ref, b_ref, a_ref = ref.in_proj_z(x[None]), ref.in_proj_b(x[None]), ref.in_proj_a(x[None])
    assert torch.equal(mixed_qkv, reference_conv_inputs(ref, x)) and torch.equal(z, z_ref.reshape(3, HV, DV))
    assert torch.equal(b, b_ref.reshape(3, HV)) and torch.equal(a, a_ref.reshape(3, HV))


def test_the_projections_of_the_input_are_one_gemm(layers):
    _, ours, _ = layers
    with torch.no_grad(), linear_calls() as calls:
        ours.project(torch.randn(3, HIDDEN))
    assert calls == [(HIDDEN, CONV_DIM + HV * DV + 2 * HV)]  # [qkvz | ba] or [qkv | z | b | a]


def test_bfloat16_recurrent_state_stays_close(layers):
    ref, ours, config = layers
    pool = make_pool(ssm_dtype="bfloat16")
    assert pool.recurrent["gdn"].dtype == torch.bfloat16
    bind(ours, pool)
    lengths, slots = [11, 4], pool.allocate(2)
    hidden = [torch.randn(n, HIDDEN) for n in lengths]
    steps = [torch.randn(1, HIDDEN) for _ in slots]
    run_layer(ours, hidden, lengths, [0, 0], slots)
    out = run_layer(ours, steps, [1, 1], lengths, slots)
    for b, slot in enumerate(slots):
        reference = CachedReference(ref, config, K, "cache")
        reference(hidden[b])
        check_slot(out[b : b + 1], reference(steps[b]), pool, "gdn", slot, reference, f"seq {b}", bound=2e-2)
    assert_untouched(pool, "gdn", slots)


def test_bind_state_rejects_a_layout_of_other_heads(layers):
    _, ours, _ = layers
    for layout, field in ((gdn_layout(HK, 2 * HV, DK, DV, conv_kernel_size=K), "conv_split"),
                          (gdn_layout(HK, HV, DK, DV, conv_kernel_size=3), "conv_kernel_size"),
                          (gdn_layout(HK, HV, DK, DV, conv_kernel_size=K, ssm_dtype="float16"), "recurrent_dtype")):  # fmt: skip
        pool = StatePool({"gdn": StateGroup(layout, num_layers=1)}, num_slots=1)
        with pytest.raises(ValueError, match=field):
            ours.bind_state(pool.layer_state("gdn", 0), layout)


def test_bad_head_counts_are_a_clear_error():
    with pytest.raises(ValueError, match="multiple of linear_num_key_heads"):
        GatedDeltaNet(HIDDEN, 3, 4, DK, DV)
    with pytest.raises(ValueError, match="projection must be one of"):
        GatedDeltaNet(HIDDEN, HK, HV, DK, DV, projection="qkv")
