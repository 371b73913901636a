"""StateLayout: shapes, splits and dtypes per layer kind, checked against numbers worked out by hand."""

import json
from pathlib import Path

import pytest
import torch

from deltaserve.state.layout import gdn_layout, kda_layout, mamba2_layout, resolve_dtype, short_conv_layout

CONFIG_48B = json.loads((Path(__file__).parent / "data" / "kimi-linear-48b-a3b-config.json").read_text())


def layout_48b(**kwargs):
    linear = CONFIG_48B["linear_attn_config"]
    return kda_layout(
        linear["num_heads"], linear["head_dim"], conv_kernel_size=linear["short_conv_kernel_size"], **kwargs
    )


@pytest.mark.parametrize("tp", [1, 2, 4, 8])
def test_kda_48b_shapes_and_bytes_per_tp(tp):
    layout = layout_48b(tp_size=tp)
    # H = 32 heads of 128: q, k, v are 4096 wide each before sharding.
    assert layout.conv_split == (4096 // tp, 4096 // tp, 4096 // tp)
    assert layout.conv_dim == 12288 // tp
    assert layout.conv_shape == (3, 12288 // tp)
    assert layout.recurrent_shape == (32 // tp, 128, 128)
    assert layout.conv_bytes == 3 * 12288 // tp * 2  # bf16
    assert layout.recurrent_bytes == 2 * 2**20 // tp  # fp32, 2 MiB at tp=1
    if tp == 1:
        assert layout.bytes_per_slot == 2_170_880


@pytest.mark.parametrize("tp", [3, 5, 64])
def test_kda_48b_rejects_tp_that_does_not_divide(tp):
    with pytest.raises(ValueError, match=rf"= (32|4096) is not divisible by tp_size = {tp}"):
        layout_48b(tp_size=tp)


@pytest.mark.parametrize("num_spec", [0, 1, 3])
def test_conv_orientation_and_num_spec(num_spec):
    sd = layout_48b(tp_size=2, num_spec=num_spec, conv_layout="SD")
    ds = layout_48b(tp_size=2, num_spec=num_spec, conv_layout="DS")
    assert sd.conv_state_len == ds.conv_state_len == 3 + num_spec
    assert sd.conv_shape == (3 + num_spec, 6144) and sd.conv_channel_axis == 1
    assert ds.conv_shape == (6144, 3 + num_spec) and ds.conv_channel_axis == 0
    assert sd.conv_bytes == ds.conv_bytes == (3 + num_spec) * 6144 * 2
    assert sd.recurrent_shape == ds.recurrent_shape == (16, 128, 128)


def test_unknown_conv_layout_is_rejected():
    with pytest.raises(ValueError, match="conv_layout"):
        layout_48b(conv_layout="TD")


def test_grouped_kda_split_by_sizes_where_chunk3_is_wrong():
    # 4 value heads of 8 and 2 key heads of 4: q = k = 8 channels, v = 32 channels.
    layout = kda_layout(4, 8, num_k_heads=2, head_k_dim=4, conv_kernel_size=4)
    assert layout.conv_split == (8, 8, 32) and layout.conv_dim == 48
    assert layout.recurrent_shape == (4, 8, 4)
    conv = torch.arange(3 * 48.0).view(3, 48)
    q, k, v = torch.split(conv, list(layout.conv_split), dim=1)
    assert torch.equal(v, conv[:, 16:48]) and torch.equal(k, conv[:, 8:16])
    wrong = conv.chunk(3, dim=1)
    assert [part.shape[1] for part in wrong] == [16, 16, 16]
    assert not torch.equal(wrong[1], k)


def test_gdn_shapes_with_more_value_heads_than_key_heads():
    # Qwen3-Next-80B: 16 key heads, 32 value heads, both of 128.
    layout = gdn_layout(16, 32, 128, 128, conv_kernel_size=4, tp_size=4)
    assert layout.conv_split == (512, 512, 1024)
    assert layout.conv_shape == (3, 2048)
    assert layout.recurrent_shape == (8, 128, 128)


def test_mamba2_extends_a_single_group_to_every_rank():
    # 1 group of state 16, 8 heads of 4 (I = 32). At tp = 4 each rank keeps its own copy of B and C.
    layout = mamba2_layout(32, 1, 8, 4, 16, 4, tp_size=4)
    assert layout.conv_split == (8, 16, 16)
    assert layout.recurrent_shape == (2, 4, 16)
    assert mamba2_layout(32, 1, 8, 4, 16, 4, tp_size=1).conv_split == (32, 16, 16)
    # 4 groups at tp = 2: no extension, 2 groups per rank.
    assert mamba2_layout(32, 4, 8, 4, 16, 4, tp_size=2).conv_split == (16, 32, 32)


def test_mamba2_rejects_groups_that_neither_divide_nor_replicate():
    with pytest.raises(ValueError, match="n_groups = 3"):
        mamba2_layout(48, 3, 12, 4, 16, 4, tp_size=2)


def test_short_conv_has_conv_state_only():
    layout = short_conv_layout(64, 3, tp_size=2, model_dtype=torch.float16)
    assert layout.shapes == ((2, 32),)
    assert layout.dtypes == (torch.float16,)
    assert not layout.has_recurrent and layout.recurrent_bytes == 0
    assert layout.bytes_per_slot == 2 * 32 * 2


def test_cache_dtype_auto_follows_model_dtype_and_names_resolve():
    assert layout_48b(model_dtype=torch.float16).conv_dtype == torch.float16
    assert layout_48b(cache_dtype="float32").conv_dtype == torch.float32
    assert layout_48b(cache_dtype="fp16").conv_dtype == torch.float16
    assert resolve_dtype("bf16", torch.float32) == torch.bfloat16


def test_kda_recurrent_state_is_always_float32():
    for cache_dtype in ("auto", "float16", "bfloat16"):
        assert layout_48b(cache_dtype=cache_dtype, model_dtype=torch.float16).recurrent_dtype == torch.float32


def test_gdn_ssm_dtype_defaults_to_cache_dtype():
    assert gdn_layout(2, 4, 8, 8, cache_dtype="float16").dtypes == (torch.float16, torch.float16)
    assert gdn_layout(2, 4, 8, 8, ssm_dtype="float32").dtypes == (torch.bfloat16, torch.float32)


@pytest.mark.parametrize("bad", ["int8", "fp42", "auto2"])
def test_bad_dtype_names_are_rejected(bad):
    with pytest.raises(ValueError, match="cache_dtype"):
        layout_48b(cache_dtype=bad)
