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

from deltaserve.engine.sequence import Sequence, SequenceStatus


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


def check_prefilled(prefilled: PrefilledPrompt, params, block_manager) -> None:
    """ValueError unless ``prefilled`` can be admitted: one sequence, exactly the prompt's blocks."""
    if params.n != 1:
        raise ValueError(f"n must be 1 for a request prefilled by another instance, got {params.n}")
    need = block_manager.num_blocks_for(len(prefilled.token_ids))
    if len(prefilled.block_ids) != need:
        raise ValueError(f"a prefilled prompt of {len(prefilled.token_ids)} tokens needs {need} KV blocks, "
                         f"got {len(prefilled.block_ids)}")


def admit_prefilled(seq: Sequence, prefilled: PrefilledPrompt, scheduler, check_stop) -> bool:
    """Queue ``seq`` as a decode (prompt computed, first token appended); True if that token ended it,
    in which case its slot and blocks are already freed and it is not queued. The engine reports the
    first token at its next ``step()``, before any forward."""
    seq.state_slot = prefilled.state_slot
    seq.block_table = list(prefilled.block_ids)
    seq.num_computed_tokens = seq.num_prompt_tokens
    seq.append_token(*prefilled.first_token)
    check_stop(seq)
    if seq.finish_reason is None:
        scheduler.add(seq)
        return False
    scheduler.state_pool.free([seq.state_slot])
    seq.state_slot = None
    scheduler.block_manager.free(seq)
    seq.status = SequenceStatus.FINISHED
    return True
