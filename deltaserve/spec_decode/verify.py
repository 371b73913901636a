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

from deltaserve.ops.conv1d import causal_conv1d_fn

# op(*inputs, recurrent_state, cu_seqlens, state_indices, has_initial_state, **kwargs) -> o
DeltaRuleOp = Callable[..., torch.Tensor]


@dataclass
class _ConvRecord:
    conv_state: torch.Tensor  # [slots+1, L, D] SD view of the pool
    weight: torch.Tensor  # [D, K]
    inputs: torch.Tensor  # [num_verify_tokens, D] pre-activation conv inputs


@dataclass
class _DeltaRuleRecord:
    op: DeltaRuleOp
    recurrent_state: torch.Tensor  # [slots+1, ...] the pool view
    inputs: tuple[torch.Tensor, ...]  # per-token tensors [num_verify_tokens, ...]
    kwargs: dict


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

    # ---- layer hooks -------------------------------------------------------------------------

    def conv(self, x: torch.Tensor, weight: torch.Tensor, conv_state: torch.Tensor, activation: str | None) -> torch.Tensor:
        """``causal_conv1d_fn`` over the batch; verify rows read their window without writing it."""
        n = self.num_tokens
        window = conv_state.index_select(0, self._index)  # [V, L, D], a copy
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
        self, op: DeltaRuleOp, inputs: tuple[torch.Tensor, ...], recurrent_state: torch.Tensor, **kwargs
    ) -> torch.Tensor:
        """``op(*inputs, recurrent_state, cu_seqlens, state_indices, has_initial_state, **kwargs)`` over the
        batch (a chunked delta-rule op); verify rows start from a copy of their state, the slot stays."""
        n = self.num_tokens
        verify_inputs = tuple(t[:n] for t in inputs)
        states = recurrent_state.index_select(0, self._index)  # [V, ...], a copy
        o = op(*verify_inputs, states, self.cu_seqlens, self._local, self._ones, **kwargs)
        self._records.append(_DeltaRuleRecord(op, recurrent_state, verify_inputs, kwargs))
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
        start = 0
        for i, (n, length) in enumerate(zip(num_accepted_tokens, self.query_lens)):
            if not 0 <= n <= length:
                raise ValueError(f"num_accepted_tokens[{i}] = {n} must be in 0..{length} (the row's verify tokens)")
            if n:
                keep.extend(range(start, start + n))
                cu.append(cu[-1] + n)
                rows.append(i)
            start += length
        records, self._records = self._records, []
        if not rows:
            return
        device = self._index.device
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
