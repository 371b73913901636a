"""The wire header: round trip, refusal of bad bytes, the one peer check, and resharding on tensors."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from deltaserve.kv.spec import KVCacheSpec
from deltaserve.state.layout import gdn_layout, kda_layout
from deltaserve.state.pool import StateGroup
from deltaserve.state.reshard import reshard_conv, reshard_heads, reshard_recurrent, source_ranks, to_orientation
from deltaserve.state.wire import WireError, WireHeader, WireMismatch, build_header, check_peer


def _header(tp: int = 1, conv_layout: str = "SD", dtype=torch.float32, fingerprint: str = "abc") -> WireHeader:
    layout = kda_layout(4, 8, tp_size=tp, conv_layout=conv_layout, model_dtype=dtype)
    kv = torch.zeros(2, 5, 16, 40, dtype=dtype)
    spec = KVCacheSpec(num_layers=2, entry_dim=40, dtype=dtype)
    return build_header(fingerprint, dtype, 16, {"kda": StateGroup(layout, 3)}, spec, kv)


def test_header_round_trips_through_bytes():
    header = _header()
    assert WireHeader.from_bytes(header.to_bytes()) == header


def test_truncated_header_is_refused():
    data = _header().to_bytes()
    with pytest.raises(WireError, match="truncated"):
        WireHeader.from_bytes(data[:-7])
    with pytest.raises(WireError, match="truncated"):
        WireHeader.from_bytes(data[:5])


def test_corrupted_header_is_refused():
    data = bytearray(_header().to_bytes())
    data[-10] ^= 0x20
    with pytest.raises(WireError, match="corrupted"):
        WireHeader.from_bytes(bytes(data))
    with pytest.raises(WireError, match="magic"):
        WireHeader.from_bytes(b"XXXX" + bytes(data[4:]))


@pytest.mark.parametrize(
    "remote, field",
    [
        (_header(fingerprint="other"), "model_fingerprint"),
        (_header(dtype=torch.bfloat16), "model_dtype"),
    ],
)
def test_mismatch_names_the_field(remote, field):
    with pytest.raises(WireMismatch, match=field) as info:
        check_peer(_header(), remote)
    assert info.value.field == field


def test_kv_dtype_mismatch_names_the_kv_field():
    local = _header()
    remote = dataclasses.replace(local, kv=dataclasses.replace(local.kv, dtype="bfloat16"))
    with pytest.raises(WireMismatch, match=r"kv\.dtype"):
        check_peer(local, remote)


def test_conv_orientation_is_converted_not_refused():
    plan = check_peer(_header(conv_layout="SD"), _header(conv_layout="DS"))
    assert plan.convert_conv == ("kda",) and not plan.reshard
    assert check_peer(_header(), _header()).is_identity


def test_other_tp_size_is_a_reshard():
    assert check_peer(_header(tp=1), _header(tp=2)).reshard


def _shard(full_parts: list[torch.Tensor], tp: int, rank: int) -> torch.Tensor:
    """Reference: each part's channels cut in ``tp`` equal ranges, rank ``rank``'s ranges side by side."""
    out = []
    for part in full_parts:
        width = part.shape[-1] // tp
        out.append(part[..., rank * width : (rank + 1) * width])
    return torch.cat(out, dim=-1)


@pytest.mark.parametrize("src_tp, dst_tp", [(1, 2), (2, 1), (2, 4), (4, 2), (4, 1), (1, 4)])
@pytest.mark.parametrize("src_layout, dst_layout", [("SD", "SD"), ("SD", "DS"), ("DS", "SD")])
def test_reshard_conv_matches_direct_sharding(src_tp, dst_tp, src_layout, dst_layout):
    # GDN: q/k narrower than v, so a chunk(3) split would be wrong.
    make = lambda tp, orient: gdn_layout(4, 8, 6, 10, tp_size=tp, conv_layout=orient, model_dtype=torch.float32)
    src, dst = make(src_tp, src_layout), make(dst_tp, dst_layout)
    widths = [w * src_tp for w in src.conv_split]
    parts = [torch.randn(5, 3, w) for w in widths]  # [slots, state_len, channels], SD
    slices = {r: to_orientation(_shard(parts, src_tp, r), "SD", src_layout) for r in range(src_tp)}
    for rank in range(dst_tp):
        got = reshard_conv(slices, src, dst, rank)
        assert got.shape[-2:] == dst.conv_shape
        torch.testing.assert_close(to_orientation(got, dst_layout, "SD"), _shard(parts, dst_tp, rank), rtol=0, atol=0)


@pytest.mark.parametrize("src_tp, dst_tp", [(1, 2), (2, 1), (2, 4), (4, 2)])
def test_reshard_recurrent_and_kv_heads(src_tp, dst_tp):
    make = lambda tp: kda_layout(8, 4, tp_size=tp, model_dtype=torch.float32)
    src, dst = make(src_tp), make(dst_tp)
    full = torch.randn(3, 8, 4, 4)  # [slots, H, Dv, Dk]
    slices = {r: full.chunk(src_tp, dim=1)[r] for r in range(src_tp)}
    kv_full = torch.randn(2, 16, 4, 6)  # [layers, block_size, kv heads, head_dim]
    kv_slices = {r: kv_full.chunk(src_tp, dim=2)[r] for r in range(src_tp)}
    for rank in range(dst_tp):
        got = reshard_recurrent(slices, src, dst, rank)
        assert got.shape[-3:] == dst.recurrent_shape
        torch.testing.assert_close(got, full.chunk(dst_tp, dim=1)[rank], rtol=0, atol=0)
        kv = reshard_heads(kv_slices, src_tp, dst_tp, rank, head_axis=2)
        torch.testing.assert_close(kv, kv_full.chunk(dst_tp, dim=2)[rank], rtol=0, atol=0)


def test_source_ranks_are_the_overlapping_ranges():
    assert source_ranks(4, 2, 1) == [2, 3]
    assert source_ranks(2, 4, 3) == [1]
    with pytest.raises(ValueError, match="divide"):
        source_ranks(3, 2, 0)
