"""The KV connector: NIXL agents that move a request's states and KV blocks between instances.

vLLM's shape (``kv_transfer/``): the producer (prefill) *saves* a finished request by keeping its
slot and blocks (:class:`~deltaserve.disagg.ledger.KVLedger`, the engine's hook) and learns from
NIXL notifications when the consumer has read them (:meth:`KVConnector.get_finished_sending`); the
consumer (decode) *starts a load* (one NIXL READ over one descriptor list: all layers, both states,
all blocks) and *waits for it* (:meth:`KVConnector.wait_for_load`) without holding the engine.

The pool tensors and the KV cache are registered once, at start. Peers are described by their
hand-shake (agent metadata, wire header, region addresses) and checked with
:func:`deltaserve.state.wire.check_peer`; a restarted peer has a new agent name, so a stale one is
never read.
"""

from __future__ import annotations

import asyncio
import base64
import importlib
import time
import uuid
from dataclasses import dataclass, field

import torch

from deltaserve.disagg.regions import Region, pool_regions, request_descs
from deltaserve.state.pool import StatePool
from deltaserve.state.wire import WireHeader, WireMismatch, WirePlan, check_peer


class TransferError(RuntimeError):
    """A load that failed (the peer died, refused, or did not answer in time)."""


def load_nixl():
    """``(nixl_agent, nixl_agent_config)`` from whichever NIXL wheel is installed."""
    for module in ("nixl._api", "nixl_cu12._api", "nixl_cu13._api"):
        try:
            api = importlib.import_module(module)
        except ImportError:
            continue
        return api.nixl_agent, api.nixl_agent_config
    raise RuntimeError("prefill/decode roles need NIXL: pip install 'deltaserve[pd]' (the nixl-cu12 wheel)")


def nixl_available() -> bool:
    try:
        load_nixl()
    except RuntimeError:
        return False
    return True


@dataclass
class Peer:
    """A prefill instance as the decode side knows it after the hand-shake."""

    url: str
    agent_name: str
    header: WireHeader
    plan: WirePlan
    regions: list[Region]
    # Conv staging per converted group (SD <-> DS): read into it, then transposed into the pool.
    staging: dict[str, torch.Tensor] = field(default_factory=dict)


class KVConnector:
    """One NIXL agent per instance over the instance's pool and KV cache."""

    def __init__(self, role: str, pool: StatePool, kv_cache: torch.Tensor | None, header: WireHeader):
        nixl_agent, nixl_agent_config = load_nixl()
        self.role = role
        self.pool = pool
        self.header = header
        # NOTE: a fresh name per process start: a peer that cached our old metadata sees the change.
        self.agent_name = f"{role}-{uuid.uuid4().hex[:12]}"
        # NOTE: no progress thread: it spins a core per agent while idle; the notification poller and the
        # consumer's state polls drive UCX progress instead.
        self.agent = nixl_agent(self.agent_name, nixl_agent_config(enable_prog_thread=False, backends=["UCX"]))
        tensors = pool_regions(pool, kv_cache)
        self.regions = [region for region, _ in tensors]
        self.mem_type = "VRAM" if pool.device.type == "cuda" else "DRAM"
        self._registered = [self.agent.register_memory([t for _, t in tensors])] if tensors else []

    # ---- hand-shake --------------------------------------------------------------------------

    def handshake_info(self) -> dict:
        return {
            "role": self.role,
            "agent_name": self.agent_name,
            "agent_metadata": base64.b64encode(self.agent.get_agent_metadata()).decode(),
            "header": base64.b64encode(self.header.to_bytes()).decode(),
            "regions": [r.to_dict() for r in self.regions],
        }

    def add_peer(self, url: str, info: dict) -> Peer:
        """Check a peer's header (``WireError`` / ``WireMismatch``), then load its agent metadata."""
        remote = WireHeader.from_bytes(base64.b64decode(info["header"]))
        plan = check_peer(self.header, remote)
        if plan.reshard:
            raise WireMismatch("tp_size", self.header.tp_size, remote.tp_size)
        regions = [Region(**r) for r in info["regions"]]
        if [r.name for r in regions] != [r.name for r in self.regions]:
            raise WireMismatch("regions", [r.name for r in self.regions], [r.name for r in regions])
        name = self.agent.add_remote_agent(base64.b64decode(info["agent_metadata"]))
        name = name.decode() if isinstance(name, bytes) else name
        peer = Peer(url, name, remote, plan, regions)
        for group in plan.convert_conv:
            conv = self.pool.conv[group]
            remote_layout = next(g for g in remote.groups if g.name == group).layout()
            staging = torch.empty((conv.shape[0], conv.shape[1], *remote_layout.conv_shape), dtype=conv.dtype,
                                  device=conv.device)
            self._registered.append(self.agent.register_memory([staging]))
            peer.staging[group] = staging
        return peer

    def remove_peer(self, peer: Peer) -> None:
        try:
            self.agent.remove_remote_agent(peer.agent_name)
        except Exception:  # noqa: BLE001 - a peer that is gone may already be invalid
            pass

    # ---- consumer: load ----------------------------------------------------------------------

    def _local_regions(self, peer: Peer) -> list[Region]:
        regions = []
        for region in self.regions:
            group = region.name.removesuffix(".conv")
            if region.name.endswith(".conv") and group in peer.staging:
                region = Region.of(region.name, "slot", peer.staging[group])
            regions.append(region)
        return regions

    def start_load(self, peer: Peer, remote_slot: int, remote_blocks: list[int], slot: int, blocks: list[int],
                   notif: str):
        """Begin the READ of the peer's slot and blocks into ours; the peer is told ``notif`` when it is done."""
        if len(remote_blocks) != len(blocks):
            raise TransferError(f"the peer sent {len(remote_blocks)} KV blocks, {len(blocks)} were reserved")
        local = self.agent.get_xfer_descs(request_descs(self._local_regions(peer), slot, blocks), self.mem_type)
        remote = self.agent.get_xfer_descs(request_descs(peer.regions, remote_slot, remote_blocks), self.mem_type)
        handle = self.agent.initialize_xfer("READ", local, remote, peer.agent_name, notif.encode())
        if self.agent.transfer(handle) == "ERR":
            self.agent.release_xfer_handle(handle)
            raise TransferError(f"NIXL refused the READ from {peer.agent_name}")
        return handle

    async def wait_for_load(self, peer: Peer, handle, slot: int, timeout_s: float) -> None:
        """Poll the READ until done (then land converted groups), ``TransferError`` on error or timeout."""
        deadline = time.monotonic() + timeout_s
        delay = 0.0
        try:
            while True:
                state = self.agent.check_xfer_state(handle)
                if state == "DONE":
                    break
                if state == "ERR":
                    raise TransferError(f"the READ from {peer.agent_name} ({peer.url}) failed")
                if time.monotonic() > deadline:
                    raise TransferError(f"the READ from {peer.agent_name} ({peer.url}) took over {timeout_s} s")
                await asyncio.sleep(delay)
                delay = min(0.002, delay + 0.0002)
        finally:
            try:
                self.agent.release_xfer_handle(handle)
            except Exception:  # noqa: BLE001 - a transfer NIXL cannot cancel; nothing more to do here
                pass
        for group, staging in peer.staging.items():
            # [layers, *conv_shape] of the peer's orientation -> ours.
            self.pool.conv[group][:, slot] = staging[:, slot].transpose(-1, -2)

    # ---- producer: completion notices --------------------------------------------------------

    def get_finished_sending(self) -> list[str]:
        """Request ids whose slot and blocks a consumer has finished reading (since the last call)."""
        done = []
        for messages in self.agent.get_new_notifs().values():
            done.extend(m.decode() if isinstance(m, bytes) else m for m in messages)
        return done
