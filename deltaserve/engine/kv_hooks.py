"""Where a KV connector (prefill/decode disaggregation, ``deltaserve.disagg``) plugs into the engine.

Two calls, both on the engine's thread:

1. ``request_finished(seq)`` when a sequence finishes (not on abort or preemption), before the
   scheduler frees its slot and blocks. A prefill instance's connector keeps what the decode
   instance will read: it takes ``seq.state_slot`` over (setting it to None, so neither the
   scheduler nor the prefix cache frees or adopts it) and holds a reference on ``seq.block_table``.
2. ``stats()`` for the engine's counters (what the connector holds).

A decode instance hands the engine a :class:`PrefilledPrompt` instead of a prompt: its states and
KV blocks are already in ``state_slot`` / ``block_ids`` and the first token was sampled by the peer.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

from deltaserve.engine.sequence import Sequence


class PrefilledPrompt(NamedTuple):
    """A prompt computed elsewhere: its states in ``state_slot``, its KV in ``block_ids``.

    ``first_token`` is ``(token_id, logprob, top_logprobs | None)`` as the sampler returns it. The
    engine owns the slot and blocks from ``add_request`` on (it frees them if the add fails).
    """

    token_ids: list[int]
    state_slot: int
    block_ids: list[int]
    first_token: tuple


class KVConnectorHooks(Protocol):
    def request_finished(self, seq: Sequence) -> None: ...

    def stats(self) -> dict: ...


class NoKVConnector:
    """A single instance: nothing is handed over."""

    def request_finished(self, seq: Sequence) -> None:
        pass

    def stats(self) -> dict:
        return {}
