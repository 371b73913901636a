"""Async scheduling (vLLM's ``async_scheduling``): the host work of a step overlaps the device's next step.

The synchronous step is ``schedule -> forward -> sample (wait for the tokens) -> postprocess``, so
the device idles while the host appends tokens, checks stops, detokenizes, builds outputs and
prepares the next batch. Here the engine keeps **one step in flight**. Each ``step()``:

1. **advance** the step in flight (``n``) as if its tokens were known: each sequence that samples at
   ``n`` gets a placeholder token (``PLACEHOLDER``) and ``num_computed_tokens`` moves on as
   ``Scheduler.postprocess`` would move it (the prefix cache's ``on_computed`` runs here, before
   step ``n + 1`` can change the slots);
2. **schedule** step ``n + 1`` as usual: the placeholder is each running decode's next input, its
   KV block is reserved as for any token;
3. **launch** step ``n + 1``: the placeholders' input ids are taken on the device from step ``n``'s
   sampled-token tensor (``TokenPatch``, no host round trip); forward and sampler are queued and
   the copy of the sampled tokens to pinned host memory is started;
4. **resolve** step ``n``: wait for its tokens (an event on that copy: the one sync of a decode step,
   and it waits for step ``n`` only), swap each placeholder for its token, run the stop checks
   (detokenizing), release finished sequences, count metrics. The engine then builds the outputs
   of step ``n`` while the device runs ``n + 1``.

A sequence that finished at step ``n`` may have a row in step ``n + 1``: that row is **discarded**
(its sampled token is dropped). The row's input is the sequence's real last token, so the slot and
the KV block it writes hold an exact state of all the sequence's tokens; the sequence keeps its slot
and blocks (``Scheduler.finish(seq, release=False)``, listed in the step's ``held``) until step
``n + 1`` is resolved, then counts that row as computed and is released, so the prefix cache
checkpoints a state that matches its token count and no slot or block is reused while the device
may still write it. An abort of a sequence with a row in flight is held the same way.

Exactness. The token ids of every step are the synchronous path's: inputs come from the same
sampled tensor, the per-request generators draw once per row in the same order (a discarded row
draws only from a finished sequence's generator), ``min_tokens`` sees the right token count (the
placeholder counts). Where the next step needs the previous tokens on the host, the step in flight
is resolved first and the next one scheduled from exact state (a synchronous step, its outputs one
call later): a sequence sampled at ``n`` with a grammar (the bitmask needs the accepted token) or
with penalties (they count the token history), a KV connector (a prefill instance hands over the
state right after the first token), and a KV cache that might make the schedule preempt (checked
before scheduling: every running sequence's next blocks must be free, after evicting cached ones).
Speculative decoding: a step with drafts needs the previous step's tokens, so the engine pipelines
only the steps for which drafting is paused (``Speculator.paused``: more sequences than
``disable_by_batch_size``, or an auto-disable pause), drains the pipeline before a step that may
draft and runs that one synchronously; with MTP drafts (the head observes every step's hidden states)
and with tensor parallelism (the step inputs are broadcast to the workers as host lists) the engine
steps synchronously altogether.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable

from deltaserve.engine.kv_hooks import NoKVConnector
from deltaserve.engine.metrics import EngineMetrics
from deltaserve.engine.model_runner import LaunchedStep, ModelRunner, TokenPatch
from deltaserve.engine.scheduler import ScheduledBatch, Scheduler
from deltaserve.engine.sequence import Sequence, SequenceStatus
from deltaserve.forward_context import host_to_device

logger = logging.getLogger(__name__)

# The host stand-in for a token still on the device (never a token id).
PLACEHOLDER = -1


def async_scheduling_enabled(config) -> bool:
    """Whether the engine pipelines its steps: ``config.async_scheduling``, where None means on for a
    CUDA device and off on the CPU (where nothing runs concurrently with the host). MTP drafts and
    tensor parallelism keep the synchronous step (logged once when asked for)."""
    wanted = config.async_scheduling
    if wanted is None:
        wanted = str(config.device).startswith("cuda")
    if not wanted:
        return False
    reasons = []
    spec = config.speculative_config
    if spec is not None and getattr(spec, "method", None) == "mtp":
        reasons.append("MTP drafts (the head observes every step)")
    if config.tensor_parallel_size > 1:
        reasons.append("tensor parallelism (step inputs are broadcast as host lists)")
    if reasons:
        if config.async_scheduling:
            logger.info("async scheduling off: %s", "; ".join(reasons))
        return False
    return True


@dataclass
class _Step:
    """A launched step: its batch, what the device returns, and what waits for it."""

    batch: ScheduledBatch
    launched: LaunchedStep
    start: float
    # seq_id -> row of ``launched.sample`` for sequences given a placeholder by ``advance``.
    placeholders: dict[int, int] = field(default_factory=dict)
    # Sequences that stopped (finished or aborted) while this step ran: released when it is resolved.
    held: list[Sequence] = field(default_factory=list)
    seq_ids: set[int] = field(default_factory=set)

    def __post_init__(self):
        self.seq_ids = {seq.seq_id for seq in self.batch.seqs}


class AsyncScheduler:
    """The engine's step with one step in flight (see the module docstring).

    ``step()`` returns the sequences that gained a token (as ``Scheduler.postprocess``); ``abort(seq)``
    replaces ``Scheduler.abort``; ``busy`` is True while a step is in flight (the engine has work).
    """

    def __init__(self, scheduler: Scheduler, runner: ModelRunner, metrics: Callable[[], EngineMetrics],
                 describe: Callable[[], dict]):
        self.scheduler = scheduler
        self.runner = runner
        self.metrics = metrics  # NOTE: a getter: the engine replaces its metrics after warm-up
        self.describe = describe
        self.inflight: _Step | None = None
        self._last_resolved = time.perf_counter()

    @property
    def busy(self) -> bool:
        return self.inflight is not None

    def step(self) -> list[Sequence]:
        prev, self.inflight = self.inflight, None
        progressed: list[Sequence] = []
        had_work = prev is not None
        if prev is not None:
            self._advance(prev)
            if not self._can_run_ahead(prev):
                progressed, prev = self._resolve(prev, None), None
        batch = self.scheduler.schedule()
        try:
            nxt = self._launch(batch, prev) if batch.seqs else None
        except Exception:
            if prev is not None:
                self._resolve(prev, None)  # NOTE: no placeholder outlives a failed step
            raise
        if prev is not None:
            progressed = self._resolve(prev, nxt)
        elif nxt is None and not had_work and self.scheduler.has_unfinished():
            raise RuntimeError(f"nothing could be scheduled with work pending: {self.describe()}")
        self.inflight = nxt
        return progressed

    def drain(self) -> list[Sequence]:
        """Resolve the step in flight, if any, launching nothing: the engine's state is then exact
        (a synchronous step may follow). Returns the sequences that gained a token."""
        step, self.inflight = self.inflight, None
        if step is None:
            return []
        self._advance(step)
        return self._resolve(step, None)

    def abort(self, seq: Sequence) -> None:
        """``Scheduler.abort``, except that a sequence with a row in flight keeps its slot and blocks
        until that step is resolved."""
        step = self.inflight
        if step is not None and seq.status == SequenceStatus.RUNNING and seq.seq_id in step.seq_ids:
            seq.finish_reason = "abort"
            self.scheduler.finish(seq, release=False)
            step.held.append(seq)
        else:
            self.scheduler.abort(seq)

    # ---- the four phases ---------------------------------------------------------------------

    def _advance(self, step: _Step) -> None:
        """Computed tokens move on and each sampling sequence gets its placeholder (tokens unknown yet)."""
        rows = {i: k for k, i in enumerate(step.launched.rows)}
        batch = step.batch
        for i, (seq, num_new) in enumerate(zip(batch.seqs, batch.num_new_tokens)):
            if seq.status != SequenceStatus.RUNNING:
                continue  # stopped while the step ran: held
            if i in rows:
                step.placeholders[seq.seq_id] = rows[i]
                seq.token_ids.append(PLACEHOLDER)
            seq.num_computed_tokens += num_new
            self.scheduler.prefix_cache.on_computed(seq)

    def _can_run_ahead(self, step: _Step) -> bool:
        """Whether the next step can be scheduled before ``step``'s tokens are known, exactly."""
        if not isinstance(self.scheduler.kv_connector, NoKVConnector):
            return False
        for seq in step.batch.seqs:
            if seq.seq_id in step.placeholders and (seq.structured is not None or seq.params.has_penalties):
                return False
        return self._blocks_suffice()

    def _blocks_suffice(self) -> bool:
        """No running sequence can be preempted by the next schedule: the blocks every running sequence
        may take in it are free (cached entries evicted for them first, as the scheduler would)."""
        bm = self.scheduler.block_manager
        budget = self.scheduler.max_num_batched_tokens
        decode = prefill = num_prefills = 0
        for seq in self.scheduler.running:
            if seq.status != SequenceStatus.RUNNING:
                continue
            need = bm.num_new_blocks(seq, min(seq.num_tokens, seq.num_computed_tokens + budget))
            if seq.is_prefill:
                prefill += need
                num_prefills += 1
            else:
                decode += need
        # NOTE: prefill chunks share the token budget: at most its blocks plus one partial block each.
        need = decode + min(prefill, bm.num_blocks_for(budget) + num_prefills)
        if not bm.can_allocate(need):
            self.scheduler.prefix_cache.make_room(num_blocks=need)
        return bm.can_allocate(need)

    def _launch(self, batch: ScheduledBatch, prev: _Step | None) -> _Step:
        """Queue ``batch``; placeholders read ``prev``'s sampled tokens on the device."""
        start = time.perf_counter()
        patch = None
        if prev is not None and prev.placeholders:
            offsets, rows = [], []
            flat = 0
            for seq, num_new in zip(batch.seqs, batch.num_new_tokens):
                row = prev.placeholders.get(seq.seq_id)
                last, first = seq.num_tokens - 1, seq.num_computed_tokens
                if row is not None and first <= last < first + num_new:
                    offsets.append(flat + last - first)
                    rows.append(row)
                flat += num_new
            if offsets:
                sampled = prev.launched.sample.token_ids
                patch = TokenPatch(offsets, sampled[host_to_device(rows, sampled.device)])
        launched = self.runner.launch(batch, patch, placeholder=PLACEHOLDER)
        return _Step(batch, launched, start)

    def _resolve(self, step: _Step, nxt: _Step | None) -> list[Sequence]:
        """Wait for ``step``'s tokens and do what ``Scheduler.postprocess`` does with them; sequences that
        stop and have a row in ``nxt`` are held by it. Releases what ``step`` held."""
        sampled = step.launched.tokens()
        progressed = []
        for seq, token in zip(step.batch.seqs, sampled):
            if token is None or seq.seq_id not in step.placeholders:
                continue
            if seq.token_ids[-1] != PLACEHOLDER:
                raise RuntimeError(f"{seq}: its last token is not the placeholder of the step in flight")
            seq.token_ids.pop()
            seq.append_token(*token)
            self.scheduler.check_stop(seq)
            progressed.append(seq)
            if seq.finish_reason is not None:
                self._stop(seq, nxt)
        batch = step.batch
        index = {seq.seq_id: i for i, seq in enumerate(batch.seqs)}
        discarded_prefill = discarded_decode = 0
        for seq in step.held:
            i = index[seq.seq_id]
            # NOTE: the row ran: its slot and blocks hold one more computed token (or chunk), exactly.
            seq.num_computed_tokens += batch.num_new_tokens[i]
            self.scheduler.prefix_cache.on_computed(seq)
            self.scheduler.release_finished(seq)
            if batch.is_prefill[i]:
                discarded_prefill += batch.num_new_tokens[i]
            else:
                discarded_decode += batch.num_new_tokens[i]
        now = time.perf_counter()
        metrics = self.metrics()
        kept_prefill, kept_decode = batch.num_prefill_tokens - discarded_prefill, batch.num_decode_tokens - discarded_decode
        if kept_prefill or kept_decode:
            # NOTE: the step's share of wall time: from its launch or the previous resolve, whichever is later.
            metrics.record_step(kept_prefill, kept_decode, len(progressed), now - max(step.start, self._last_resolved))
        metrics.async_discarded_tokens += discarded_prefill + discarded_decode
        self._last_resolved = now
        return progressed

    def _stop(self, seq: Sequence, nxt: _Step | None) -> None:
        if seq.status == SequenceStatus.RUNNING:
            held = nxt is not None and seq.seq_id in nxt.seq_ids
            self.scheduler.finish(seq, release=not held)
            if held:
                nxt.held.append(seq)
        elif seq.status == SequenceStatus.WAITING:
            # NOTE: preempted while its token was in flight (the schedule avoids it; kept exact anyway).
            self.scheduler.waiting.remove(seq)
            seq.status = SequenceStatus.FINISHED
