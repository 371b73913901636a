"""The wire header of a prefill/decode hand-over: what one instance's states and KV blocks look like.

A header is data (frozen dataclasses that serialise) and is checked in one place,
:func:`check_peer`: a mismatch that cannot be converted is one ``WireMismatch`` naming the field;
what can be converted (conv orientation SD <-> DS; a different TP size, through the layout's channel
split and head ranges, see :mod:`deltaserve.state.reshard`) is returned as a :class:`WirePlan`.

Bytes: ``MAGIC | version u16 | payload length u32 | crc32 u32 | JSON payload`` (little endian), so
a truncated or corrupted header is refused before its fields are read.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch

from deltaserve.state.layout import StateLayout
from deltaserve.state.pool import StateGroup

WIRE_VERSION = 1
MAGIC = b"DSKV"
_PREFIX = struct.Struct("<4sHII")


class WireError(ValueError):
    """A header that cannot be read (bad magic, unknown version, truncated, corrupted)."""


class WireMismatch(ValueError):
    """Two instances whose states cannot be handed over; ``field`` names what differs."""

    def __init__(self, field: str, local, remote):
        self.field = field
        super().__init__(f"{field}: this instance has {local!r}, the peer has {remote!r}")


def dtype_name(dtype: torch.dtype | None) -> str | None:
    return None if dtype is None else str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class GroupWire:
    """One state group (layers of one kind sharing a layout) on one TP rank."""

    name: str
    kind: str
    num_layers: int
    conv_split: tuple[int, ...]
    conv_split_names: tuple[str, ...]
    conv_layout: str
    conv_kernel_size: int
    num_spec: int
    conv_dtype: str
    recurrent_shape: tuple[int, ...] | None
    recurrent_dtype: str | None
    tp_size: int
    tp_rank: int

    @classmethod
    def of(cls, name: str, group: StateGroup, tp_rank: int = 0) -> "GroupWire":
        lay = group.layout
        return cls(
            name, lay.kind, group.num_layers, tuple(lay.conv_split), tuple(lay.conv_split_names), lay.conv_layout,
            lay.conv_kernel_size, lay.num_spec, dtype_name(lay.conv_dtype),
            None if lay.recurrent_shape is None else tuple(lay.recurrent_shape), dtype_name(lay.recurrent_dtype),
            lay.tp_size, tp_rank,
        )

    def layout(self) -> StateLayout:
        """The :class:`StateLayout` this entry describes (for conversion on the receiving side)."""
        return StateLayout(
            kind=self.kind, conv_split=self.conv_split, conv_split_names=self.conv_split_names,
            conv_dtype=getattr(torch, self.conv_dtype), recurrent_shape=self.recurrent_shape,
            recurrent_dtype=None if self.recurrent_dtype is None else getattr(torch, self.recurrent_dtype),
            conv_layout=self.conv_layout, conv_kernel_size=self.conv_kernel_size, num_spec=self.num_spec,
            tp_size=self.tp_size,
        )


@dataclass(frozen=True)
class KVWire:
    """The paged KV cache: ``[num_layers, num_blocks, *block_shape]`` of ``dtype``; ``spec`` = the KV-cache spec."""

    spec_kind: str
    spec: tuple[tuple[str, str], ...]  # the spec's fields, as strings, sorted by name
    num_layers: int
    block_shape: tuple[int, ...]
    dtype: str

    @classmethod
    def of(cls, spec, kv_cache: torch.Tensor) -> "KVWire":
        fields = spec._asdict() if hasattr(spec, "_asdict") else dataclasses.asdict(spec)
        items = tuple(sorted((k, dtype_name(v) if isinstance(v, torch.dtype) else str(v)) for k, v in fields.items()))
        return cls(type(spec).__name__, items, kv_cache.shape[0], tuple(kv_cache.shape[2:]), dtype_name(kv_cache.dtype))


@dataclass(frozen=True)
class WireHeader:
    """Everything a peer must agree on before it reads this instance's slots and blocks."""

    model_fingerprint: str
    model_dtype: str
    block_size: int
    groups: tuple[GroupWire, ...]
    kv: KVWire | None
    tp_size: int = 1
    tp_rank: int = 0
    version: int = WIRE_VERSION

    def to_bytes(self) -> bytes:
        payload = json.dumps(dataclasses.asdict(self), sort_keys=True, separators=(",", ":")).encode()
        return _PREFIX.pack(MAGIC, self.version, len(payload), zlib.crc32(payload)) + payload

    @classmethod
    def from_bytes(cls, data: bytes) -> "WireHeader":
        """The header in ``data``; ``WireError`` naming what is wrong with it otherwise."""
        if len(data) < _PREFIX.size:
            raise WireError(f"wire header truncated: {len(data)} bytes, the fixed prefix alone has {_PREFIX.size}")
        magic, version, length, crc = _PREFIX.unpack_from(data)
        if magic != MAGIC:
            raise WireError(f"wire header: magic {magic!r} is not {MAGIC!r} (not a deltaserve KV header)")
        if version != WIRE_VERSION:
            raise WireError(f"wire header version {version}: this instance reads version {WIRE_VERSION}")
        payload = data[_PREFIX.size :]
        if len(payload) != length:
            raise WireError(f"wire header truncated: payload has {len(payload)} bytes, the header says {length}")
        if zlib.crc32(payload) != crc:
            raise WireError("wire header corrupted: crc32 of the payload does not match")
        try:
            raw = json.loads(payload)
            groups = tuple(GroupWire(**_tuples(g)) for g in raw.pop("groups"))
            kv = raw.pop("kv")
            kv = None if kv is None else KVWire(**_tuples(kv))
            return cls(groups=groups, kv=kv, **raw)
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise WireError(f"wire header payload is not a version-{WIRE_VERSION} header: {exc}") from None


def _tuples(raw: dict) -> dict:
    """JSON lists back to the tuples of the frozen dataclasses (nested for ``spec``)."""
    out = {}
    for key, value in raw.items():
        if isinstance(value, list):
            value = tuple(tuple(v) if isinstance(v, list) else v for v in value)
        out[key] = value
    return out


@dataclass(frozen=True)
class WirePlan:
    """How the receiving side lands the peer's bytes: per group, whether its conv state is transposed
    (SD <-> DS) and whether the TP sizes differ (a reshard by split and head ranges)."""

    convert_conv: tuple[str, ...] = ()
    reshard: bool = False

    @property
    def is_identity(self) -> bool:
        return not self.convert_conv and not self.reshard


def check_peer(local: WireHeader, remote: WireHeader) -> WirePlan:
    """The one check of a hand-shake: a ``WirePlan``, or ``WireMismatch`` naming the first field that differs."""
    _same("version", local.version, remote.version)
    _same("model_fingerprint", local.model_fingerprint, remote.model_fingerprint)
    _same("model_dtype", local.model_dtype, remote.model_dtype)
    _same("block_size", local.block_size, remote.block_size)
    _same("groups", [g.name for g in local.groups], [g.name for g in remote.groups])
    reshard = local.tp_size != remote.tp_size
    convert = []
    for mine, theirs in zip(local.groups, remote.groups):
        where = f"groups[{mine.name}]"
        for name in ("kind", "num_layers", "conv_split_names", "conv_kernel_size", "num_spec", "conv_dtype",
                     "recurrent_dtype"):
            _same(f"{where}.{name}", getattr(mine, name), getattr(theirs, name))
        # NOTE: split widths and head counts are per rank: compare them over all ranks.
        _same(f"{where}.conv_split (x tp_size)", _scaled(mine.conv_split, mine.tp_size),
              _scaled(theirs.conv_split, theirs.tp_size))
        _same(f"{where}.recurrent_shape (heads x tp_size)", _heads(mine), _heads(theirs))
        if mine.conv_layout != theirs.conv_layout:
            convert.append(mine.name)
    if (local.kv is None) != (remote.kv is None):
        _same("kv", local.kv, remote.kv)
    if local.kv is not None:
        for name in ("spec_kind", "spec", "num_layers", "block_shape", "dtype"):
            if name == "block_shape" and reshard:
                continue  # NOTE: per-head K/V caches are sharded by heads; the reshard checks the ranges
            _same(f"kv.{name}", getattr(local.kv, name), getattr(remote.kv, name))
    return WirePlan(tuple(convert), reshard)


def _same(field: str, local, remote) -> None:
    if local != remote:
        raise WireMismatch(field, local, remote)


def _scaled(split: tuple[int, ...], tp_size: int) -> tuple[int, ...]:
    return tuple(width * tp_size for width in split)


def _heads(group: GroupWire) -> tuple[int, ...] | None:
    shape = group.recurrent_shape
    return None if shape is None else (shape[0] * group.tp_size, *shape[1:])


def model_fingerprint(model_dir: str | Path) -> str:
    """sha256 over ``config.json`` and, per weight file, its name, size and first and last 64 KiB.

    NOTE: cheap at start for a 100 GB checkpoint, and two checkpoints of one config with different
    weights (another seed, another fine-tune) still differ.
    """
    path = Path(model_dir)
    digest = hashlib.sha256()
    config = path / "config.json"
    if config.is_file():
        digest.update(json.dumps(json.loads(config.read_text()), sort_keys=True).encode())
    for file in sorted(path.glob("*.safetensors")):
        size = file.stat().st_size
        digest.update(f"{file.name}:{size}".encode())
        with file.open("rb") as f:
            digest.update(f.read(1 << 16))
            f.seek(max(0, size - (1 << 16)))
            digest.update(f.read(1 << 16))
    return digest.hexdigest()[:32]


def build_header(
    fingerprint: str,
    model_dtype: torch.dtype,
    block_size: int,
    groups: Mapping[str, StateGroup],
    kv_spec,
    kv_cache: torch.Tensor | None,
    tp_rank: int = 0,
) -> WireHeader:
    """The header of one instance (groups in name order: the order of the transfer's descriptors)."""
    wires = tuple(GroupWire.of(name, groups[name], tp_rank) for name in sorted(groups))
    tp_size = wires[0].tp_size if wires else 1
    kv = None if kv_cache is None or kv_cache.shape[0] == 0 else KVWire.of(kv_spec, kv_cache)
    return WireHeader(fingerprint, dtype_name(model_dtype), block_size, wires, kv, tp_size, tp_rank)
