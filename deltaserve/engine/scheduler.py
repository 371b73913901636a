"""Continuous batching: which sequences run in the next forward, and with how many tokens.

Each step is one flat batch under ``max_num_batched_tokens``: running decodes first (oldest
first), then running chunked prefills, then new sequences from the waiting queue, a prompt longer
than the remaining budget being split across steps. A running sequence holds one state slot
(from the first schedule to finish/abort/preemption) and the KV blocks its tokens need. When a
sequence cannot get its blocks, the newest running sequence is preempted by recompute.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from deltaserve.engine.kv_hooks import KVConnectorHooks, NoKVConnector
from deltaserve.engine.prefix_hooks import NoPrefixCache, PrefixCacheHooks
from deltaserve.engine.sequence import Sequence, SequenceStatus
from deltaserve.kv.block_manager import BlockManager


@dataclass
class ScheduledBatch:
    """Sequences of one forward, with the number of new tokens of each (``query_lens``)."""

    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    # Per sequence: True when this step computes its last uncomputed token, so a token is sampled.
    do_sample: list[bool] = field(default_factory=list)
    # Per sequence: True when this step is a (chunked) prefill or recompute, False for a decode.
    is_prefill: list[bool] = field(default_factory=list)
    # Per sequence: draft tokens verified after the last sampled token (the last of num_new_tokens).
    # NOTE: sequences with drafts come first, so the verify rows are the batch's first rows.
    num_draft_tokens: list[int] = field(default_factory=list)
    # Per sequence: (offset, slot) pairs, states to save inside the forward (prefix-cache checkpoints).
    checkpoints: list[list[tuple[int, int]]] = field(default_factory=list)

    @property
    def num_verify_seqs(self) -> int:
        return sum(1 for n in self.num_draft_tokens if n > 0)

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)

    @property
    def num_prefill_tokens(self) -> int:
        return sum(n for n, p in zip(self.num_new_tokens, self.is_prefill) if p)

    @property
    def num_decode_tokens(self) -> int:
        return sum(n for n, p in zip(self.num_new_tokens, self.is_prefill) if not p)

    def __len__(self) -> int:
        return len(self.seqs)


@dataclass
class _Picks:
    """The batch being built: ``seq_id -> (seq, num_new_tokens)`` and the token budget left."""

    tokens_left: int
    entries: dict[int, tuple[Sequence, int]] = field(default_factory=dict)

    def add(self, seq: Sequence, num_new: int) -> None:
        self.entries[seq.seq_id] = (seq, num_new)
        self.tokens_left -= num_new

    def drop(self, seq: Sequence) -> None:
        _, num_new = self.entries.pop(seq.seq_id, (None, 0))
        self.tokens_left += num_new


class Scheduler:
    """Waiting and running queues over a state-slot pool and a KV block manager.

    ``state_pool`` needs ``allocate(n) -> list[int]``, ``free(slots)`` and ``num_free_slots``
    (a :class:`deltaserve.state.pool.StatePool`). ``check_stop(seq)`` sets ``seq.finish_reason``
    once a sampled token ends the sequence.
    """

    def __init__(
        self,
        *,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        state_pool,
        block_manager: BlockManager,
        check_stop: Callable[[Sequence], None],
        prefix_cache: PrefixCacheHooks | None = None,
        kv_connector: KVConnectorHooks | None = None,
    ):
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.state_pool = state_pool
        self.block_manager = block_manager
        self.check_stop = check_stop
        self.prefix_cache = prefix_cache if prefix_cache is not None else NoPrefixCache()
        self.kv_connector = kv_connector if kv_connector is not None else NoKVConnector()
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        # Steps in which the head of the waiting queue stayed there for lack of a free state slot.
        self.num_slot_waits = 0

    # ---- queues ------------------------------------------------------------------------------

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting) or bool(self.running)

    def abort(self, seq: Sequence) -> None:
        """Drop ``seq`` at once, returning its slot and blocks; ``finish_reason`` becomes ``"abort"``."""
        if seq.status == SequenceStatus.RUNNING:
            self._release(seq)
            self.running.remove(seq)
        elif seq.status == SequenceStatus.WAITING:
            self.waiting.remove(seq)
        if seq.status != SequenceStatus.FINISHED:
            seq.finish_reason = "abort"
        seq.status = SequenceStatus.FINISHED

    # ---- schedule ----------------------------------------------------------------------------

    def schedule(self) -> ScheduledBatch:
        """Pick the next batch; allocates slots and blocks, may preempt. Empty when nothing can run."""
        # NOTE: the budget is kept as a running count: summing the picks per sequence is quadratic.
        picks = _Picks(self.max_num_batched_tokens)
        preemptions_before = self.num_preemptions

        # 1. Running sequences: decodes first (those with drafts to verify before those without),
        # then chunked prefills; oldest first within each.
        for seq in sorted(self.running, key=lambda s: (s.is_prefill, not s.spec_token_ids, s.seq_id)):
            if seq.status != SequenceStatus.RUNNING:
                continue  # preempted above to make room for an older sequence
            if picks.tokens_left <= 0:
                break
            wanted = seq.num_uncomputed_tokens + (len(seq.spec_token_ids) if not seq.is_prefill else 0)
            num_new = self.prefix_cache.clip_chunk(seq, min(wanted, picks.tokens_left))
            if self._reserve_blocks(seq, num_new, picks):
                picks.add(seq, num_new)

        # 2. Waiting sequences, in order, while budget, sequence count, slots and blocks allow.
        # NOTE: none after a preemption in this step (unless nothing else runs): the blocks are
        # short, and the preempted sequence (now first in line) would be recomputed at once.
        admit = self.num_preemptions == preemptions_before or not picks.entries
        while admit and self.waiting and picks.tokens_left > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            # NOTE: a sequence prefilled by another instance arrives with its slot, blocks and
            # num_computed_tokens; the prefix cache only tracks it (see PrefixCache.match).
            if seq.state_slot is None:
                if self.state_pool.num_free_slots == 0:
                    self.prefix_cache.make_room(num_slots=1)
                if self.state_pool.num_free_slots == 0:
                    self.num_slot_waits += 1
                    break
                seq.state_slot = self.state_pool.allocate(1)[0]
            # NOTE: prompt logprobs need the logits of every prompt position: no prefix-cache hit.
            if seq.prompt_logprobs is None:
                seq.num_computed_tokens = self.prefix_cache.match(seq)
            num_new = self.prefix_cache.clip_chunk(seq, min(seq.num_uncomputed_tokens, picks.tokens_left))
            need = self.block_manager.num_new_blocks(seq, seq.num_computed_tokens + num_new)
            if not self.block_manager.can_allocate(need):
                self.prefix_cache.make_room(num_blocks=need)
            if not self.block_manager.can_allocate(need):
                # NOTE: admission never preempts; running sequences free blocks as they finish.
                self._release(seq)
                break
            self.block_manager.allocate(seq, seq.num_computed_tokens + num_new)
            if seq.num_cached_tokens is None:
                seq.num_cached_tokens = seq.num_computed_tokens  # NOTE: the first admission's, as vLLM
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            picks.add(seq, num_new)

        batch = ScheduledBatch()
        # NOTE: verify rows first; a sequence sorted among them may have lost its drafts to a clipped chunk.
        entries = sorted(picks.entries.values(), key=lambda e: e[1] <= e[0].num_uncomputed_tokens)
        for seq, num_new in entries:
            batch.seqs.append(seq)
            batch.num_new_tokens.append(num_new)
            # NOTE: >=, as a verify row runs past its tokens (its drafts are not in token_ids yet).
            batch.do_sample.append(seq.num_computed_tokens + num_new >= seq.num_tokens)
            # NOTE: a prompt's last token alone after a prefix-cache hit is still a prompt token.
            batch.is_prefill.append(seq.is_prefill or seq.num_computed_tokens < seq.num_prompt_tokens)
            num_drafts = max(0, num_new - seq.num_uncomputed_tokens)
            batch.num_draft_tokens.append(num_drafts)
            del seq.spec_token_ids[num_drafts:]  # drafts cut by the token budget or a chunk end are dropped
            # NOTE: asked last, once no sequence of the batch can be preempted any more.
            batch.checkpoints.append(self.prefix_cache.checkpoint_slots(seq, num_new) if batch.is_prefill[-1] else [])
        return batch

    def _reserve_blocks(self, seq: Sequence, num_new: int, picks: _Picks) -> bool:
        """Give ``seq`` blocks for ``num_new`` more tokens, preempting newer sequences if needed.

        Returns False when ``seq`` itself had to be preempted (every other running sequence is older).
        """
        num_tokens = seq.num_computed_tokens + num_new
        while not self.block_manager.can_allocate(need := self.block_manager.num_new_blocks(seq, num_tokens)):
            # NOTE: cached entries go first (a preempted victim's own checkpoint too), then the newest sequence.
            self.prefix_cache.make_room(num_blocks=need)
            if self.block_manager.can_allocate(need):
                break
            others = [s for s in self.running if s is not seq]
            victim = max(others, key=lambda s: s.seq_id, default=None)
            if victim is None or victim.seq_id < seq.seq_id:
                self.preempt(seq)
                return False
            picks.drop(victim)
            self.preempt(victim)
        self.block_manager.allocate(seq, num_tokens)
        return True

    def preempt(self, seq: Sequence) -> None:
        """Recompute later: free slot and blocks, forget computed tokens, put it first in line."""
        self._release(seq)
        self.running.remove(seq)
        seq.status = SequenceStatus.WAITING
        seq.spec_token_ids = []
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def _release(self, seq: Sequence) -> None:
        self.prefix_cache.on_release(seq)
        self.block_manager.free(seq)
        if seq.state_slot is not None:
            self.state_pool.free([seq.state_slot])
            seq.state_slot = None
        seq.num_computed_tokens = 0

    # ---- postprocess -------------------------------------------------------------------------

    def postprocess(
        self,
        batch: ScheduledBatch,
        sampled: list,
        commit: Callable[[list[int]], None] | None = None,
    ) -> list[Sequence]:
        """Append sampled tokens, advance computed tokens, finish stopped sequences.

        ``sampled[i]`` is ``(token_id, logprob, top_logprobs | None)`` where ``batch.do_sample[i]``, a
        list of them for a verify row (its accepted drafts, then the target's token), else None.
        Tokens are appended one at a time until one stops the sequence; a verify row then counts as
        computed its last sampled token plus the drafts kept, and ``commit(num_accepted_tokens)``
        (one entry per verify row, 0 for a row no longer running) makes the states hold them before
        the prefix cache sees the new ``num_computed_tokens``. Returns the sequences that gained tokens.
        """
        progressed = []
        num_computed = []
        drafts = batch.num_draft_tokens or [0] * len(batch)
        for seq, num_new, num_drafts, sample in zip(batch.seqs, batch.num_new_tokens, drafts, sampled):
            if seq.status != SequenceStatus.RUNNING:
                num_computed.append(0)
                continue  # aborted after it was scheduled
            if sample is None:
                num_computed.append(num_new)
                continue
            tokens = sample if isinstance(sample, list) else [sample]
            kept = 0
            for token in tokens:
                seq.append_token(*token)
                kept += 1
                self.check_stop(seq)
                if seq.finish_reason is not None:
                    break
            if num_drafts:
                seq.num_draft_tokens += num_drafts
                seq.num_accepted_tokens += len(tokens) - 1
            # NOTE: a verify row computed its first token and the drafts now in token_ids, no more.
            num_computed.append(kept if num_drafts else num_new)
            progressed.append(seq)
        num_verify = batch.num_verify_seqs
        if num_verify and commit is not None:
            commit(num_computed[:num_verify])
        for seq, n in zip(batch.seqs, num_computed):
            if seq.status != SequenceStatus.RUNNING:
                continue
            seq.num_computed_tokens += n
            self.prefix_cache.on_computed(seq)
            if seq.finish_reason is not None:
                self.finish(seq)
        return progressed

    def finish(self, seq: Sequence, release: bool = True) -> None:
        """End a running sequence that stopped: its slot and blocks go back (``release_finished``),
        unless ``release`` is False (async scheduling: a step still in flight computes its row, and
        the caller releases it once that step is done)."""
        if release:
            self.release_finished(seq)
        self.running.remove(seq)
        seq.status = SequenceStatus.FINISHED

    def release_finished(self, seq: Sequence) -> None:
        """Free what a finished sequence holds (the KV connector may keep it for a peer first)."""
        self.kv_connector.request_finished(seq)
        self._release(seq)
