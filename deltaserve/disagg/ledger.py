"""Slots and KV blocks a connector owns outside any sequence (engine thread only, except ``expect``).

- Prefill side, *held*: a finished request's slot and blocks, kept until the decode instance has
  read them (a completion notice), asks to drop them, or ``hold_timeout_s`` passes.
- Decode side, *reserved*: a slot and blocks allocated for a transfer in flight; on success they
  are handed to the engine with the request (``PrefilledPrompt``), else given back.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

from deltaserve.engine.sequence import Sequence


class NoRoom(RuntimeError):
    """No free state slot or KV blocks for a transfer, even after the prefix cache gave back what it holds."""


@dataclass
class Held:
    request_id: str
    slot: int
    block_ids: list[int]
    prompt_token_ids: list[int]
    first_token: tuple  # (token_id, logprob, [[token_id, logprob, rank], ...] | None)
    deadline: float


@dataclass
class _Blocks:
    block_table: list[int] = field(default_factory=list)


class KVLedger:
    """The engine's :class:`~deltaserve.engine.kv_hooks.KVConnectorHooks` for both roles."""

    def __init__(self, engine: Any, hold_timeout_s: float):
        self.pool = engine.runner.state_pool
        self.bm = engine.block_manager
        self.scheduler = engine.scheduler
        self.hold_timeout_s = hold_timeout_s
        self.held: dict[str, Held] = {}
        self.reserved: dict[str, tuple[int, list[int]]] = {}
        self._expected: set[str] = set()
        self._lock = threading.Lock()
        self.num_released = self.num_expired = self.num_loaded = self.num_load_failures = 0
        self.load_bytes = 0
        self.load_seconds = 0.0

    # ---- prefill side ------------------------------------------------------------------------

    def expect(self, request_id: str) -> None:
        """Mark a request as handed over when it finishes (any thread)."""
        with self._lock:
            self._expected.add(request_id)

    def forget(self, request_id: str) -> None:
        with self._lock:
            self._expected.discard(request_id)

    def request_finished(self, seq: Sequence) -> None:
        """The engine hook: keep an expected request's slot and hold its blocks for the peer."""
        with self._lock:
            expected = seq.request_id in self._expected
            self._expected.discard(seq.request_id)
        if not expected or seq.state_slot is None or seq.finish_reason == "abort":
            return
        self.bm.hold(seq.block_table)
        slot, seq.state_slot = seq.state_slot, None
        top = None
        if seq.logprobs:
            top = [[token, lp.logprob, lp.rank] for token, lp in seq.logprobs[-1].items()]
        first = (seq.token_ids[-1], seq.cumulative_logprob, top)
        self.held[seq.request_id] = Held(seq.request_id, slot, list(seq.block_table),
                                         seq.token_ids[: seq.num_prompt_tokens], first,
                                         time.monotonic() + self.hold_timeout_s)

    def release(self, request_id: str) -> bool:
        """Give a held request's slot and blocks back (read by the peer, or dropped); False if not held."""
        held = self.held.pop(request_id, None)
        if held is None:
            return False
        self.pool.free([held.slot])
        self.bm.release(list(reversed(held.block_ids)))
        self.num_released += 1
        return True

    def expire(self, now: float | None = None) -> list[str]:
        """Release every hold past its deadline (the peer never read it); returns their ids."""
        now = time.monotonic() if now is None else now
        late = [rid for rid, held in self.held.items() if held.deadline <= now]
        for request_id in late:
            self.release(request_id)
        self.num_expired += len(late)
        return late

    # ---- decode side -------------------------------------------------------------------------

    def reserve(self, key: str, num_tokens: int) -> tuple[int, list[int]]:
        """A zeroed slot and the blocks for ``num_tokens`` tokens; ``NoRoom`` when there are none."""
        need = self.bm.num_blocks_for(num_tokens)
        self.scheduler.prefix_cache.make_room(num_slots=1, num_blocks=need)
        if self.pool.num_free_slots == 0 or not self.bm.can_allocate(need):
            raise NoRoom(f"no room for a {num_tokens}-token hand-over: {self.pool.num_free_slots} free state slots, "
                         f"{self.bm.num_free_blocks} free KV blocks ({need} needed)")
        slot = self.pool.allocate(1)[0]
        holder = _Blocks()
        self.bm.allocate(holder, num_tokens)
        self.reserved[key] = (slot, holder.block_table)
        return slot, holder.block_table

    def unreserve(self, key: str) -> None:
        """Give a reservation back (the transfer failed or the client left)."""
        entry = self.reserved.pop(key, None)
        if entry is not None:
            self.pool.free([entry[0]])
            self.bm.release(list(reversed(entry[1])))

    def take_reserved(self, key: str) -> tuple[int, list[int]]:
        """Hand a filled reservation over (to the engine, with its request)."""
        return self.reserved.pop(key)

    def record_load(self, num_bytes: int, seconds: float) -> None:
        """A finished READ: its bytes and its time from the start of the transfer to its completion."""
        self.num_loaded += 1
        self.load_bytes += num_bytes
        self.load_seconds += seconds

    def stats(self) -> dict:
        return dict(
            kv_transfer_held_requests=len(self.held),
            kv_transfer_reserved_requests=len(self.reserved),
            kv_transfer_released=self.num_released,
            kv_transfer_expired=self.num_expired,
            kv_transfer_loaded=self.num_loaded,
            kv_transfer_load_failures=self.num_load_failures,
            kv_transfer_load_bytes=self.load_bytes,
            kv_transfer_load_seconds=self.load_seconds,
        )
