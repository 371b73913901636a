"""Legacy four-state KDA snapshots <-> two-state, against channel positions written out here."""

import pytest
import torch

from deltaserve.state.layout import kda_layout, short_conv_layout
from deltaserve.state.legacy import four_to_two, two_to_four

# Grouped widths: q = k = 2 heads x 4 = 8 channels, v = 4 heads x 8 = 32 channels; kernel 4, num_spec 1.
WIDTHS = {"q": 8, "k": 8, "v": 32}


def grouped_layout(conv_layout):
    return kda_layout(4, 8, num_k_heads=2, head_k_dim=4, num_spec=1, conv_layout=conv_layout, model_dtype=torch.float64)


def four_state(conv_layout, leading=(2, 3)):
    generator = torch.Generator().manual_seed(0)
    state_len = 4  # K - 1 + num_spec
    parts = []
    for name in ("q", "k", "v"):
        shape = (state_len, WIDTHS[name]) if conv_layout == "SD" else (WIDTHS[name], state_len)
        parts.append(torch.randn(*leading, *shape, generator=generator, dtype=torch.float64))
    recurrent = torch.randn(*leading, 4, 8, 4, generator=generator)
    return (*parts, recurrent)


@pytest.mark.parametrize("conv_layout", ["SD", "DS"])
def test_four_to_two_puts_q_k_v_at_their_channel_offsets(conv_layout):
    conv_q, conv_k, conv_v, recurrent = four_state(conv_layout)
    conv, recurrent_out = four_to_two((conv_q, conv_k, conv_v, recurrent), grouped_layout(conv_layout))
    channels = conv if conv_layout == "DS" else conv.transpose(-1, -2)  # [..., 48, state_len]
    assert channels.shape == (2, 3, 48, 4)
    for channel in range(48):
        if channel < 8:
            part, index = conv_q, channel
        elif channel < 16:
            part, index = conv_k, channel - 8
        else:
            part, index = conv_v, channel - 16
        expected = part[..., index, :] if conv_layout == "DS" else part[..., :, index]
        assert torch.equal(channels[..., channel, :], expected)
    assert recurrent_out is recurrent


@pytest.mark.parametrize("conv_layout", ["SD", "DS"])
@pytest.mark.parametrize("leading", [(), (5,), (2, 3)])
def test_four_two_four_round_trip_is_exact(conv_layout, leading):
    layout = grouped_layout(conv_layout)
    four = four_state(conv_layout, leading)
    back = two_to_four(four_to_two(four, layout), layout)
    for original, restored in zip(four, back):
        assert restored.shape == original.shape and torch.equal(restored, original)


@pytest.mark.parametrize("conv_layout", ["SD", "DS"])
def test_two_four_two_round_trip_is_exact(conv_layout):
    layout = grouped_layout(conv_layout)
    conv = torch.randn(3, *layout.conv_shape, dtype=torch.float64)
    recurrent = torch.randn(3, *layout.recurrent_shape)
    conv_back, recurrent_back = four_to_two(two_to_four((conv, recurrent), layout), layout)
    assert torch.equal(conv_back, conv) and torch.equal(recurrent_back, recurrent)


def test_two_to_four_splits_by_sizes_not_chunk3():
    layout = grouped_layout("SD")
    conv = torch.randn(*layout.conv_shape, dtype=torch.float64)
    conv_q, conv_k, conv_v, _ = two_to_four((conv, torch.zeros(layout.recurrent_shape)), layout)
    assert [conv_q.shape[-1], conv_k.shape[-1], conv_v.shape[-1]] == [8, 8, 32]
    assert torch.equal(conv_v, conv[:, 16:])
    assert conv.chunk(3, dim=-1)[2].shape[-1] == 16  # what chunk(3) would wrongly call v


def test_four_to_two_accepts_the_48b_shapes():
    layout = kda_layout(32, 128, tp_size=8, model_dtype=torch.bfloat16)
    parts = [torch.zeros(3, 512, dtype=torch.bfloat16) for _ in range(3)]
    conv, _ = four_to_two((*parts, torch.zeros(4, 128, 128)), layout)
    assert conv.shape == (3, 1536) and conv.dtype == torch.bfloat16


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda s: (s[0][..., :-1], *s[1:]), r"conv_q has shape \(2, 3, 4, 7\); expected \(\.\.\., 4, 8\)"),
        (lambda s: (s[0], s[1], s[2][..., :3, :], s[3]), r"conv_v has shape \(2, 3, 3, 32\); expected \(\.\.\., 4, 32\)"),
        (lambda s: (*s[:3], s[3][..., :2]), r"recurrent has shape \(2, 3, 4, 8, 2\)"),
        (lambda s: (*s[:3], s[3][0]), "leading dims"),
        (lambda s: (s[0].float(), *s[1:]), "share one dtype"),
        (lambda s: s[:3], "4 tensors"),
    ],
)
def test_four_to_two_rejects_shapes_that_do_not_fit_the_layout(mutate, message):
    with pytest.raises(ValueError, match=message):
        four_to_two(mutate(four_state("SD")), grouped_layout("SD"))


def test_four_to_two_rejects_the_other_orientation():
    with pytest.raises(ValueError, match="conv_layout DS"):
        four_to_two(four_state("SD"), grouped_layout("DS"))


def test_two_to_four_rejects_a_conv_state_of_another_tp():
    layout = grouped_layout("SD")
    with pytest.raises(ValueError, match=r"conv_state has shape \(4, 24\)"):
        two_to_four((torch.zeros(4, 24), torch.zeros(layout.recurrent_shape)), layout)


def test_layouts_without_three_parts_and_recurrent_are_rejected():
    with pytest.raises(ValueError, match="'short_conv' layout"):
        two_to_four((torch.zeros(3, 8), torch.zeros(1)), short_conv_layout(8, 4))
