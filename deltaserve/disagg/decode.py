"""The decode role: load a request's states and KV blocks from its prefill instance, then decode it.

``/v1/completions`` and ``/v1/chat/completions`` take the router's ``kv_transfer_params`` (what the
prefill instance returned); :meth:`KVConsumer.load` turns them into a
:class:`~deltaserve.engine.kv_hooks.PrefilledPrompt` the engine admits as a decode. Every failure
is a :class:`RequestError` that names the peer, and gives back what was reserved.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any

import httpx

from deltaserve.disagg.connector import KVConnector, Peer, TransferError
from deltaserve.disagg.ledger import KVLedger, NoRoom
from deltaserve.disagg.regions import request_bytes
from deltaserve.engine.kv_hooks import PrefilledPrompt
from deltaserve.server.serving import RequestError
from deltaserve.state.wire import WireError, WireMismatch

logger = logging.getLogger(__name__)

# NOTE: fault injection for the tests: while the file this names exists, a load waits (up to 30 s)
# between its reservation and its READ, so that a test can kill the instance mid-transfer.
FAULT_PAUSE_ENV = "DELTASERVE_KV_LOAD_PAUSE_FILE"


async def _fault_pause() -> None:
    path = os.environ.get(FAULT_PAUSE_ENV)
    for _ in range(3000):
        if not path or not os.path.exists(path):
            return
        await asyncio.sleep(0.01)

_FIELDS = {"remote_url": str, "remote_agent": str, "remote_request_id": str, "remote_slot": int,
           "remote_block_ids": list, "prompt_token_ids": list, "first_token": list}


def _parse(params: Any) -> dict:
    if not isinstance(params, dict):
        raise RequestError("kv_transfer_params: must be an object (what the prefill instance returned)",
                           "kv_transfer_params")
    for name, kind in _FIELDS.items():
        if not isinstance(params.get(name), kind):
            raise RequestError(f"kv_transfer_params.{name}: missing or not a {kind.__name__}", "kv_transfer_params")
    first = params["first_token"]
    if len(first) != 3 or not isinstance(first[0], int):
        raise RequestError("kv_transfer_params.first_token: must be [token_id, logprob, top | null]",
                           "kv_transfer_params")
    return params


def _first_token(first: list) -> tuple:
    from deltaserve.engine.outputs import Logprob

    token_id, logprob, top = first
    top = None if top is None else {int(t): Logprob(float(lp), int(rank)) for t, lp, rank in top}
    return (int(token_id), float(logprob), top)


class KVConsumer:
    """The decode side's loads: hand-shakes cached per prefill URL, reservations through the ledger."""

    def __init__(self, connector: KVConnector, ledger: KVLedger, engine_loop: Any, load_timeout_s: float):
        self.connector = connector
        self.ledger = ledger
        self.engine_loop = engine_loop
        self.load_timeout_s = load_timeout_s
        self.peers: dict[str, Peer] = {}
        self._client: httpx.AsyncClient | None = None
        self._lock = asyncio.Lock()

    @property
    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=httpx.Timeout(10.0), trust_env=False)
        return self._client

    async def peer(self, url: str, agent_name: str | None = None) -> Peer:
        """The checked peer at ``url``; a fresh hand-shake when it is new or its agent changed (a restart)."""
        async with self._lock:
            peer = self.peers.get(url)
            if peer is not None and (agent_name is None or peer.agent_name == agent_name):
                return peer
            response = await self.client.get(f"{url}/disagg/handshake")
            response.raise_for_status()
            if peer is not None:
                self.connector.remove_peer(peer)
                del self.peers[url]
            peer = self.connector.add_peer(url, response.json())
            self.peers[url] = peer
            logger.info("hand-shake with %s: agent %s, plan %s", url, peer.agent_name, peer.plan)
            return peer

    async def connect(self, url: str) -> Peer:
        """A hand-shake as a clear error: 502 naming the peer and the field that differs."""
        try:
            return await self.peer(url)
        except (WireError, WireMismatch) as exc:
            raise RequestError(f"the prefill instance {url} was refused at hand-shake: {exc}", "kv_transfer_params",
                               status=502, type="server_error", code="kv_handshake_refused") from exc
        except (httpx.HTTPError, ValueError, KeyError) as exc:
            raise RequestError(f"the prefill instance {url} did not answer the hand-shake: {exc!r}",
                               "kv_transfer_params", status=502, type="server_error", code="kv_peer_unreachable")

    async def load(self, request_id: str, params: Any) -> PrefilledPrompt:
        """Reserve a slot and blocks, READ the peer's into them, and return the prompt for the engine."""
        params = _parse(params)
        url = params["remote_url"].rstrip("/")
        peer = await self.connect(url)
        if peer.agent_name != params["remote_agent"]:
            peer = await self.connect_again(url, params["remote_agent"])
        prompt = [int(t) for t in params["prompt_token_ids"]]
        blocks_remote = [int(b) for b in params["remote_block_ids"]]
        try:
            slot, blocks = await self.engine_loop.call(lambda engine: self.ledger.reserve(request_id, len(prompt)))
        except NoRoom as exc:
            await self.drop_remote(url, params["remote_request_id"])
            raise RequestError(str(exc), status=503, type="server_overloaded", code="kv_no_room") from exc
        try:
            await _fault_pause()
            started = time.perf_counter()
            handle = self.connector.start_load(peer, params["remote_slot"], blocks_remote, slot, blocks,
                                               params["remote_request_id"])
            await self.connector.wait_for_load(peer, handle, slot, self.load_timeout_s)
        except BaseException as exc:
            self.ledger.num_load_failures += 1
            await self.engine_loop.call(lambda engine: self.ledger.unreserve(request_id))
            if isinstance(exc, asyncio.CancelledError):
                raise
            await self.drop_remote(url, params["remote_request_id"])
            if isinstance(exc, TransferError):
                raise RequestError(f"KV transfer from the prefill instance {url} failed: {exc}", status=502,
                                   type="server_error", code="kv_transfer_failed") from exc
            raise
        self.ledger.take_reserved(request_id)
        self.ledger.record_load(request_bytes(self.connector.regions, len(blocks)), time.perf_counter() - started)
        return PrefilledPrompt(prompt, slot, blocks, _first_token(params["first_token"]))

    async def connect_again(self, url: str, agent_name: str) -> Peer:
        """The request names another agent than the one cached: the peer restarted, hand-shake again."""
        try:
            peer = await self.peer(url, agent_name)
        except (WireError, WireMismatch, httpx.HTTPError) as exc:
            raise RequestError(f"the prefill instance {url} was refused at hand-shake: {exc}", status=502,
                               type="server_error", code="kv_handshake_refused") from exc
        if peer.agent_name != agent_name:
            raise RequestError(f"the prefill instance {url} now runs agent {peer.agent_name}, the request was "
                               f"prefilled by {agent_name} (it restarted since): its KV is gone", status=502,
                               type="server_error", code="kv_peer_restarted")
        return peer

    async def drop_remote(self, url: str, remote_request_id: str) -> None:
        """Tell the prefill instance to free what it holds for a request we will not read (best effort)."""
        try:
            await self.client.post(f"{url}/disagg/release", json={"request_id": remote_request_id}, timeout=2.0)
        except httpx.HTTPError:
            pass  # NOTE: it frees it at its hold timeout anyway
