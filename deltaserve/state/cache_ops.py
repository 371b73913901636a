"""State and KV-cache writes made between forwards (prefix-cache restores and checkpoints, slot zeroing,
speculative decoding's commit of the accepted tokens).

They run at once on the process that decides them (TP rank 0, where the scheduler and the prefix
cache live); with ``record=True`` each is also logged, and the log travels with the next step's
broadcast so that every other rank replays the same writes, in the same order, on its own shards
before that step's forward (:meth:`CacheOps.replay`). No forward runs between a write and its
replay, so every rank's pool holds what a single process would.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from deltaserve.state.copy import copy_slots
from deltaserve.state.pool import StatePool


class CacheOp(NamedTuple):
    """``kind``: ``"zero"`` (slots), ``"copy"`` (src slots, dst slots), ``"kv_rows"`` (src block,
    dst block, rows: the first ``rows`` entries of every attention layer) or ``"commit"`` (accepted
    tokens per verify row of the last forward)."""

    kind: str
    args: tuple


class CacheOps:
    """The writes of one process's pool and KV cache (``[attn_layers, blocks, block_size, dim]`` or None).

    ``commit``: replays the accepted tokens of the last forward's verify rows into their slots.
    """

    def __init__(
        self,
        pool: StatePool,
        kv_cache: torch.Tensor | None,
        *,
        record: bool = False,
        commit: Callable[[list[int]], None] | None = None,
    ):
        self.pool = pool
        self.kv_cache = kv_cache
        self._commit = commit
        self.log: list[CacheOp] | None = [] if record else None
        if record:
            pool.zero_hook = self._record_zero

    def copy_states(self, src: list[int], dst: list[int]) -> None:
        """Both states of every linear layer, slot ``src[i]`` -> ``dst[i]``."""
        copy_slots(self.pool, src, dst)
        if self.log is not None:
            self.log.append(CacheOp("copy", (list(src), list(dst))))

    def copy_kv_rows(self, src_block: int, dst_block: int, rows: int) -> None:
        """The first ``rows`` KV entries of block ``src_block`` into ``dst_block``, every attention layer."""
        if self.kv_cache is not None:
            self.kv_cache[:, dst_block, :rows] = self.kv_cache[:, src_block, :rows]
        if self.log is not None:
            self.log.append(CacheOp("kv_rows", (src_block, dst_block, rows)))

    def commit_verified(self, num_accepted_tokens: list[int]) -> None:
        """Make each verify row's states hold its first ``num_accepted_tokens[i]`` tokens."""
        if self._commit is None:
            raise RuntimeError("commit_verified on cache ops without a commit")
        self._commit(num_accepted_tokens)
        if self.log is not None:
            self.log.append(CacheOp("commit", (list(num_accepted_tokens),)))

    def _record_zero(self, slots: list[int]) -> None:
        self.log.append(CacheOp("zero", (list(slots),)))

    def drain(self) -> list[CacheOp]:
        """The writes logged since the last drain (empty without ``record``)."""
        if not self.log:
            return []
        ops, self.log = self.log, []
        return ops

    def replay(self, ops: list[CacheOp]) -> None:
        """Apply ``ops`` (another rank's log) to this process's pool and KV cache, in order."""
        for kind, args in ops:
            if kind == "zero":
                self.pool.zero(args[0])
            elif kind == "copy":
                self.copy_states(*args)
            elif kind == "commit":
                self.commit_verified(*args)
            elif kind == "kv_rows":
                self.copy_kv_rows(*args)
            else:
                raise ValueError(f"unknown cache op {kind!r}")
