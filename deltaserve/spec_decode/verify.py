"""Multi-token verification for the linear layers: read each state, keep the inputs, commit the accepted prefix.

A verify row runs ``1 + k`` tokens (the last sampled token and ``k`` drafts) from the state after
its computed tokens. Its linear layers (KDA, GDN: any short conv + delta-rule layer) compute their
outputs for all ``1 + k`` positions from a *copy* of the slot's states and leave the slot as it was;
they keep the step's inputs (the conv inputs and the delta-rule's q, k, v, g, beta). Once the
sampler knows how many tokens ``n`` of each row are accepted, :meth:`VerifyBatch.commit` replays the
first ``n`` inputs into the slot with the ordinary ops, so the slot holds exactly the state of a run
that never saw the rejected tokens (conv window included: no ``num_spec`` widening is needed).

Rows that do not verify (prefill chunks, decodes without drafts) run in the same calls and update
their slots in place as without speculation. Verify rows are the first rows of the batch.
See docs/architecture.md ("Speculative decoding") for why replay and not a state per position.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from deltaserve.ops.conv1d import causal_conv1d_fn, causal_conv1d_update

# Chunked: op(*inputs, recurrent_state, cu_seqlens, state_indices, has_initial_state, **kwargs) -> o;
# one token per sequence: step_op(*inputs, recurrent_state, state_indices, **kwargs) -> o.
DeltaRuleOp = Callable[..., torch.Tensor]


def _use_steps(x: torch.Tensor) -> bool:
    """Run the 1 + k tokens as vectorised one-token steps (CPU) rather than the chunked op (GPU).

    NOTE: the chunked op's torch reference loops over sequences in Python, ten times slower than
    ``1 + k`` steps batched over sequences; on the GPU one chunked launch reads each state once.
    """
    return not x.is_cuda


@dataclass
class _ConvRecord:
    conv_state: torch.Tensor  # [slots+1, L, D] SD view of the pool
    weight: torch.Tensor  # [D, K]
    inputs: torch.Tensor  # [num_verify_tokens, D] pre-activation conv inputs


@dataclass
class _DeltaRuleRecord:
    op: DeltaRuleOp
    step_op: DeltaRuleOp | None
    recurrent_state: torch.Tensor  # [slots+1, ...] the pool view
    inputs: tuple[torch.Tensor, ...]  # per-token tensors [num_verify_tokens, ...]
    kwargs: dict


@dataclass
class _Steps:
    """Token ``t`` of every row that has one: flat token indices and the rows' state indices, per ``t``."""

    tokens: list[torch.Tensor]
    states: list[torch.Tensor]

    @classmethod
    def build(cls, starts: list[int], lengths: list[int], state_ids: list[int], device) -> "_Steps":
        tokens, states = [], []
        for t in range(max(lengths, default=0)):
            rows = [i for i, n in enumerate(lengths) if n > t]
            tokens.append(torch.tensor([starts[i] + t for i in rows], device=device))
            states.append(torch.tensor([state_ids[i] for i in rows], dtype=torch.int32, device=device))
        return cls(tokens, states)


class VerifyBatch:
    """The verify rows of one forward (the first ``num_seqs`` of ``ctx``) and what their layers keep.

    Set as ``ForwardContext.spec_decode`` by the model runner; linear layers call :meth:`conv` and
    :meth:`delta_rule` in place of the ops; the runner calls :meth:`commit` after sampling.
    """

    def __init__(self, ctx, num_seqs: int):
        if not 0 < num_seqs <= ctx.num_seqs:
            raise ValueError(f"num_seqs must be in 1..{ctx.num_seqs} (the batch's sequences), got {num_seqs}")
        if not all(c > 0 for c in ctx.num_computed_tokens[:num_seqs]):
            raise ValueError("verify rows must continue a computed sequence (num_computed_tokens > 0)")
        device = ctx.cu_seqlens.device
        self.num_seqs = num_seqs
        self.query_lens = list(ctx.query_lens[:num_seqs])
        self.num_tokens = sum(self.query_lens)
        self.cu_seqlens = ctx.cu_seqlens[: num_seqs + 1]
        self.state_indices = ctx.state_indices[:num_seqs]
        self._index = self.state_indices.long()
        self._local = torch.arange(num_seqs, dtype=torch.int32, device=device)
        self._ones = torch.ones(num_seqs, dtype=torch.bool, device=device)
        self.has_rest = num_seqs < ctx.num_seqs
        if self.has_rest:
            self.rest_cu_seqlens = ctx.cu_seqlens[num_seqs:] - self.num_tokens
            self.rest_state_indices = ctx.state_indices[num_seqs:]
            self.rest_has_initial_state = ctx.has_initial_state[num_seqs:]
        self._records: list[_ConvRecord | _DeltaRuleRecord] = []
        self._starts = [0]
        for n in self.query_lens[:-1]:
            self._starts.append(self._starts[-1] + n)
        self._steps: _Steps | None = None  # token t of each row, on the local (scratch) indices

    def _verify_steps(self) -> _Steps:
        if self._steps is None:
            self._steps = _Steps.build(self._starts, self.query_lens, list(range(self.num_seqs)), self._index.device)
        return self._steps

    # ---- layer hooks -------------------------------------------------------------------------

    def conv(self, x: torch.Tensor, weight: torch.Tensor, conv_state: torch.Tensor, activation: str | None) -> torch.Tensor:
        """``causal_conv1d_fn`` over the batch; verify rows read their window without writing it."""
        n = self.num_tokens
        window = conv_state.index_select(0, self._index)  # [V, L, D], a copy
        if _use_steps(x):
            y = x.new_empty((n, x.shape[1]))
            steps = self._verify_steps()
            for tokens, rows in zip(steps.tokens, steps.states):
                y[tokens] = causal_conv1d_update(x[tokens], weight, window, rows, activation)
        else:
            y = causal_conv1d_fn(x[:n], weight, window, self.cu_seqlens, self._local, self._ones, activation)
        self._records.append(_ConvRecord(conv_state, weight, x[:n]))
        if not self.has_rest:
            return y
        rest = causal_conv1d_fn(
            x[n:], weight, conv_state, self.rest_cu_seqlens, self.rest_state_indices, self.rest_has_initial_state,
            activation,
        )  # fmt: skip
        return torch.cat([y, rest])

    def delta_rule(
        self,
        op: DeltaRuleOp,
        inputs: tuple[torch.Tensor, ...],
        recurrent_state: torch.Tensor,
        step_op: DeltaRuleOp | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """``op(*inputs, recurrent_state, cu_seqlens, state_indices, has_initial_state, **kwargs)`` over the
        batch (a chunked delta-rule op; ``step_op`` its one-token form); verify rows start from a copy
        of their state, the slot stays."""
        n = self.num_tokens
        verify_inputs = tuple(t[:n] for t in inputs)
        states = recurrent_state.index_select(0, self._index)  # [V, ...], a copy
        if step_op is not None and _use_steps(inputs[0]):
            steps = self._verify_steps()
            outs = [step_op(*(t[tokens] for t in verify_inputs), states, rows, **kwargs)
                    for tokens, rows in zip(steps.tokens, steps.states)]  # fmt: skip
            o = outs[0].new_empty((n, *outs[0].shape[1:]))
            for tokens, out in zip(steps.tokens, outs):
                o[tokens] = out
        else:
            o = op(*verify_inputs, states, self.cu_seqlens, self._local, self._ones, **kwargs)
        self._records.append(_DeltaRuleRecord(op, step_op, recurrent_state, verify_inputs, kwargs))
        if not self.has_rest:
            return o
        rest = op(
            *(t[n:] for t in inputs), recurrent_state,
            self.rest_cu_seqlens, self.rest_state_indices, self.rest_has_initial_state, **kwargs,
        )  # fmt: skip
        return torch.cat([o, rest])

    # ---- commit ------------------------------------------------------------------------------

    def commit(self, num_accepted_tokens: list[int]) -> None:
        """Replay the first ``num_accepted_tokens[i]`` inputs of verify row ``i`` into its slot, in every layer.

        ``0`` leaves row ``i``'s slot untouched (an aborted sequence); at most ``query_lens[i]``.
        """
        if len(num_accepted_tokens) != self.num_seqs:
            raise ValueError(f"num_accepted_tokens has {len(num_accepted_tokens)} entries, expected {self.num_seqs}")
        keep, cu, rows = [], [0], []
        for i, (n, length, start) in enumerate(zip(num_accepted_tokens, self.query_lens, self._starts)):
            if not 0 <= n <= length:
                raise ValueError(f"num_accepted_tokens[{i}] = {n} must be in 0..{length} (the row's verify tokens)")
            if n:
                keep.extend(range(start, start + n))
                cu.append(cu[-1] + n)
                rows.append(i)
        records, self._records = self._records, []
        if not rows:
            return
        device = self._index.device
        if _use_steps(self._index):
            self._commit_steps(records, num_accepted_tokens)
            return
        keep_index = torch.tensor(keep, device=device)
        cu_seqlens = torch.tensor(cu, dtype=torch.int32, device=device)
        slots = self.state_indices[torch.tensor(rows, device=device)] if len(rows) < self.num_seqs else self.state_indices
        ones = self._ones[: len(rows)]
        for record in records:
            if isinstance(record, _ConvRecord):
                causal_conv1d_fn(record.inputs[keep_index], record.weight, record.conv_state, cu_seqlens, slots, ones, None)
            else:
                inputs = tuple(t[keep_index] for t in record.inputs)
                record.op(*inputs, record.recurrent_state, cu_seqlens, slots, ones, **record.kwargs)

    def _commit_steps(self, records: list, num_accepted_tokens: list[int]) -> None:
        """:meth:`commit` as one-token steps batched over rows (the CPU path of :func:`_use_steps`)."""
        steps = _Steps.build(self._starts, num_accepted_tokens, self.state_indices.tolist(), self._index.device)
        for record in records:
            for tokens, slots in zip(steps.tokens, steps.states):
                if isinstance(record, _ConvRecord):
                    causal_conv1d_update(record.inputs[tokens], record.weight, record.conv_state, slots, None)
                elif record.step_op is not None:
                    record.step_op(*(t[tokens] for t in record.inputs), record.recurrent_state, slots, **record.kwargs)
            if isinstance(record, _DeltaRuleRecord) and record.step_op is None:
                self._commit_chunked(record, num_accepted_tokens)

    def _commit_chunked(self, record: _DeltaRuleRecord, num_accepted_tokens: list[int]) -> None:
        rows = [i for i, n in enumerate(num_accepted_tokens) if n]
        keep = torch.tensor([self._starts[i] + t for i in rows for t in range(num_accepted_tokens[i])],
                            device=self._index.device)  # fmt: skip
        cu = [0]
        for i in rows:
            cu.append(cu[-1] + num_accepted_tokens[i])
        slots = self.state_indices[torch.tensor(rows, device=self._index.device)]
        record.op(*(t[keep] for t in record.inputs), record.recurrent_state,
                  torch.tensor(cu, dtype=torch.int32, device=slots.device), slots, self._ones[: len(rows)],
                  **record.kwargs)  # fmt: skip
