"""KimiDeltaAttention on a flat mixed batch and a state pool vs transformers' KimiLinearDeltaAttention per sequence."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import rel_err
from helpers_layer import (CachedReference, assert_untouched, check_decode_steps, check_mixed_batch, check_slot,
                           linear_calls, nan_pool, run_layer, slot_states)  # fmt: skip
from transformers import KimiLinearConfig
from transformers.models.kimi_linear.modeling_kimi_linear import KimiLinearDeltaAttention

from deltaserve.layers.kda import KimiDeltaAttention
from deltaserve.state.layout import kda_layout
from deltaserve.state.pool import StateGroup, StatePool

HIDDEN, H, D, K = 64, 2, 16, 4
BOUND = 1e-5


def tiny_config() -> KimiLinearConfig:
    return KimiLinearConfig(
        hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, vocab_size=128,
        linear_attn_config={
            "num_heads": H, "head_dim": D, "short_conv_kernel_size": K, "kda_layers": [1], "full_attn_layers": [2],
        },
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip


@pytest.fixture(scope="module")
def layers() -> tuple[KimiLinearDeltaAttention, KimiDeltaAttention, KimiLinearConfig]:
    """transformers' layer with non-trivial random weights, and ours holding the same weights."""
    torch.manual_seed(1)
    config = tiny_config()
    ref = KimiLinearDeltaAttention(config, layer_idx=0).eval()
    with torch.no_grad():
        ref.conv1d.weight.normal_(0, 0.5)
        # A in [1, 16], dt in [1e-3, 1e-1] through an inverse softplus, as transformers' _init_weights
        ref.forget_gate.A_log.copy_(torch.empty(1, 1, H, 1).uniform_(1, 16).log())
        dt = torch.empty(H * D).uniform_(math.log(1e-3), math.log(1e-1)).exp()
        ref.forget_gate.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        ref.o_norm.weight.copy_(1 + 0.2 * torch.randn(D))
    ours = KimiDeltaAttention.from_config(config, layer_idx=0).eval()
    ours.load_state_dict(checkpoint_weights(ref))
    return ref, ours, config


def checkpoint_weights(ref: KimiLinearDeltaAttention) -> dict[str, torch.Tensor]:
    """transformers' parameters under the Kimi-Linear checkpoint names (undoing conversion_mapping)."""
    state = {}
    for name, tensor in ref.state_dict().items():
        if name == "conv1d.weight":
            for part, w in zip("qkv", tensor.chunk(3, dim=0)):
                state[f"{part}_conv1d.weight"] = w.clone()
        else:
            state[name.removeprefix("forget_gate.")] = tensor.clone()
    return state


def make_pool(num_spec: int = 0, conv_layout: str = "SD") -> StatePool:
    layout = kda_layout(H, D, conv_kernel_size=K, num_spec=num_spec, conv_layout=conv_layout, model_dtype=torch.float32)
    return nan_pool("kda", layout)


def bind(ours: KimiDeltaAttention, pool: StatePool) -> None:
    ours.bind_state(pool.layer_state("kda", 0), pool.groups["kda"].layout)


def test_state_dict_names_and_shapes_are_the_checkpoints(layers):
    _, ours, config = layers
    layer = KimiDeltaAttention.from_config(config, layer_idx=0, dtype=torch.bfloat16)
    shapes = {name: tuple(t.shape) for name, t in layer.state_dict().items()}
    assert shapes == {
        "q_proj.weight": (H * D, HIDDEN), "k_proj.weight": (H * D, HIDDEN), "v_proj.weight": (H * D, HIDDEN),
        "q_conv1d.weight": (H * D, 1, K), "k_conv1d.weight": (H * D, 1, K), "v_conv1d.weight": (H * D, 1, K),
        "A_log": (1, 1, H, 1), "dt_bias": (H * D,), "f_a_proj.weight": (D, HIDDEN), "f_b_proj.weight": (H * D, D),
        "b_proj.weight": (H, HIDDEN), "g_a_proj.weight": (D, HIDDEN), "g_b_proj.weight": (H * D, D),
        "o_norm.weight": (D,), "o_proj.weight": (HIDDEN, H * D),
    }  # fmt: skip
    assert layer.A_log.dtype == layer.dt_bias.dtype == torch.float32
    assert layer.q_proj.weight.dtype == layer.o_norm.weight.dtype == torch.bfloat16


def test_the_six_projections_of_the_input_are_one_gemm(layers):
    _, ours, _ = layers
    pool = make_pool()
    bind(ours, pool)
    with linear_calls() as calls:
        run_layer(ours, [torch.randn(1, HIDDEN), torch.randn(1, HIDDEN)], [1, 1], [0, 0], pool.allocate(2))
    # [q | k | v | b | f_a | g_a], then f_b, g_b and o_proj
    assert calls == [(HIDDEN, 3 * H * D + H + 2 * D), (D, H * D), (D, H * D), (H * D, HIDDEN)]


@pytest.mark.parametrize("conv_layout", ["SD", "DS"])
def test_prefill_batch_matches_transformers_per_sequence(layers, conv_layout):
    ref, ours, config = layers
    pool = make_pool(conv_layout=conv_layout)
    bind(ours, pool)
    lengths, slots = [5, 1, 70], pool.allocate(3)
    hidden = [torch.randn(n, HIDDEN) for n in lengths]
    out = run_layer(ours, hidden, lengths, [0, 0, 0], slots).split(lengths)
    for b, slot in enumerate(slots):
        reference = CachedReference(ref, config, K, "cache_params")
        check_slot(out[b], reference(hidden[b]), pool, "kda", slot, reference, f"sequence {b}")
    assert_untouched(pool, "kda", slots)


@pytest.mark.parametrize("conv_layout", ["SD", "DS"])
def test_mixed_batch_prefill_continuation_and_decode_in_one_forward(layers, conv_layout):
    ref, ours, config = layers
    pool = make_pool(conv_layout=conv_layout)
    bind(ours, pool)
    check_mixed_batch(ours, pool, "kda", lambda: CachedReference(ref, config, K, "cache_params"), HIDDEN)


@pytest.mark.parametrize("conv_layout", ["SD", "DS"])
def test_decode_only_steps_match_transformers_decode(layers, conv_layout):
    ref, ours, config = layers
    pool = make_pool(conv_layout=conv_layout)
    bind(ours, pool)
    check_decode_steps(ours, pool, "kda", lambda: CachedReference(ref, config, K, "cache_params"), HIDDEN)


@pytest.mark.parametrize("conv_layout", ["SD", "DS"])
def test_spec_layout_conv_state_keeps_last_state_len_inputs(layers, conv_layout):
    ref, ours, config = layers
    num_spec = 2
    state_len = K - 1 + num_spec
    pool = make_pool(num_spec=num_spec, conv_layout=conv_layout)
    bind(ours, pool)
    lengths, slots = [2, 9], pool.allocate(2)
    hidden = [torch.randn(n, HIDDEN) for n in lengths]
    run_layer(ours, hidden, lengths, [0, 0], slots)
    step = [torch.randn(1, HIDDEN) for _ in slots]
    out = run_layer(ours, step, [1, 1], lengths, slots)
    for b, slot in enumerate(slots):
        x = torch.cat([hidden[b], step[b]])
        with torch.no_grad():
            inputs = torch.cat([ref.q_proj(x), ref.k_proj(x), ref.v_proj(x)], dim=-1)  # conv inputs, q|k|v
        expected = torch.cat([torch.zeros(state_len, 3 * H * D), inputs])[-state_len:]
        assert rel_err(slot_states(pool, "kda", slot)[0], expected) < BOUND
        reference = CachedReference(ref, config, K, "cache_params")
        reference(hidden[b])
        assert rel_err(out[b : b + 1], reference(step[b])) < BOUND


def test_conv_weight_cache_follows_weight_loads(layers):
    ref, _, config = layers
    layer = KimiDeltaAttention.from_config(config, layer_idx=0)
    stale = layer.fuse_conv_weights().clone()
    layer.load_state_dict(checkpoint_weights(ref))
    fused = layer.fuse_conv_weights()
    assert not torch.equal(fused, stale)
    assert torch.equal(fused, ref.conv1d.weight.detach().squeeze(1))


def test_bind_state_rejects_a_layout_of_other_heads(layers):
    _, ours, _ = layers
    layout = kda_layout(H * 2, D, conv_kernel_size=K, model_dtype=torch.float32)
    pool = StatePool({"kda": StateGroup(layout, num_layers=1)}, num_slots=1)
    with pytest.raises(ValueError, match="conv_split"):
        ours.bind_state(pool.layer_state("kda", 0), layout)


def test_bf16_layer_stays_close_to_fp32_transformers(layers):
    ref, _, config = layers
    layer = KimiDeltaAttention.from_config(config, layer_idx=0, dtype=torch.bfloat16).eval()
    layer.load_state_dict(checkpoint_weights(ref))
    assert layer.A_log.dtype == torch.float32 and layer.q_proj.weight.dtype == torch.bfloat16
    layout = kda_layout(H, D, conv_kernel_size=K, model_dtype=torch.bfloat16)
    pool = StatePool({"kda": StateGroup(layout, num_layers=1)}, num_slots=2)
    layer.bind_state(pool.layer_state("kda", 0), layout)
    lengths, slots = [11, 4], pool.allocate(2)
    hidden = [torch.randn(n, HIDDEN) for n in lengths]
    out = run_layer(layer, [h.bfloat16() for h in hidden], lengths, [0, 0], slots).split(lengths)
    step = run_layer(layer, [torch.ones(1, HIDDEN, dtype=torch.bfloat16)] * 2, [1, 1], lengths, slots)
    for b in range(2):
        reference = CachedReference(ref, config, K, "cache_params")
        assert out[b].dtype == torch.bfloat16
        assert rel_err(out[b].float(), reference(hidden[b])) < 2e-2
        assert rel_err(step[b : b + 1].float(), reference(torch.ones(1, HIDDEN))) < 2e-2
