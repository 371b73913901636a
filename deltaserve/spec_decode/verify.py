"""Multi-token verification for the linear layers: read each state, keep the inputs, commit the accepted prefix.

A verify row runs ``1 + k`` tokens (the last sampled token and ``k`` drafts) from the state after
its computed tokens. Its linear layers (KDA, GDN: any short conv + delta-rule layer) compute their
outputs for all ``1 + k`` positions and leave the slot as it was: the delta rule runs token by token
from the slot without storing (``recurrent_delta_rule_varlen``), the conv from a copy of the window.
They keep the step's inputs (the conv inputs and the delta rule's q, k, v, g, beta). Once the sampler
knows how many tokens ``n`` of each row are accepted, :meth:`VerifyBatch.commit` replays the first
``n`` inputs into the slot, so it holds exactly the state of a run that never saw the rejected tokens
(conv window included: no ``num_spec`` widening is needed).

Rows that do not verify (prefill chunks, decodes without drafts) run in the same calls and update
their slots in place as without speculation. Verify rows are the first rows of the batch. A CUDA
graph of verify steps (``engine/cuda_graph.py``) runs every row as a verify row and commits with
:meth:`VerifyBatch.commit_on_device` (counts on the device, fixed shapes).
See docs/architecture.md ("Speculative decoding") for why replay and not a state per position.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from deltaserve.forward_context import StateCheckpoints, host_to_device
from deltaserve.ops.conv1d import causal_conv1d_fn, causal_conv1d_update
from deltaserve.ops.delta_rule_varlen import recurrent_delta_rule_varlen

# op(*inputs, recurrent_state, cu_seqlens, state_indices, has_initial_state, checkpoints=..., **kwargs) -> o
ChunkedOp = Callable[..., torch.Tensor]


def _conv_steps(x: torch.Tensor) -> bool:
    """Run a verify row's conv as one-token updates batched over rows (CPU) rather than one varlen call.

    NOTE: the varlen conv's torch reference loops over sequences in Python, several times slower for
    ``1 + k`` tokens than ``1 + k`` batched updates; on the GPU one varlen launch beats ``1 + k``.
    """
    return not x.is_cuda


@dataclass
class _ConvRecord:
    conv_state: torch.Tensor  # [slots+1, L, D] SD view of the pool
    weight: torch.Tensor  # [D, K]
    inputs: torch.Tensor  # [num_verify_tokens, D] pre-activation conv inputs


@dataclass
class _DeltaRuleRecord:
    recurrent_state: torch.Tensor  # [slots+1, Hv, Dv, Dk] the pool view
    inputs: tuple[torch.Tensor, ...]  # q, k, v, g, beta of the verify tokens
    kwargs: dict


@dataclass
class _Rows:
    """A varlen selection of the verify tokens: flat token indices, ``cu_seqlens``, state slots."""

    tokens: torch.Tensor | None  # None: every verify token, in order (all drafts accepted)
    cu_seqlens: torch.Tensor
    state_indices: torch.Tensor
    lengths: list[int]


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
        self.num_seqs = num_seqs
        self.query_lens = list(ctx.query_lens[:num_seqs])
        self.num_tokens = sum(self.query_lens)
        self.cu_seqlens = ctx.cu_seqlens[: num_seqs + 1]
        self.state_indices = ctx.state_indices[:num_seqs]
        self._starts = [0]
        for n in self.query_lens[:-1]:
            self._starts.append(self._starts[-1] + n)
        device = self.cu_seqlens.device
        self._local = torch.arange(num_seqs, dtype=torch.int32, device=device)
        self._ones = torch.ones(num_seqs, dtype=torch.bool, device=device)
        self.has_rest = num_seqs < ctx.num_seqs
        self.rest_checkpoints = None
        if self.has_rest:
            self.rest_cu_seqlens = ctx.cu_seqlens[num_seqs:] - self.num_tokens
            self.rest_state_indices = ctx.state_indices[num_seqs:]
            self.rest_has_initial_state = ctx.has_initial_state[num_seqs:]
            if ctx.checkpoints is not None:
                # Prefix-cache checkpoints inside the other rows' prefill chunks, indexed within those rows.
                rest = range(num_seqs, ctx.num_seqs)
                self.rest_checkpoints = StateCheckpoints.from_batch(
                    [ctx.checkpoints.for_sequence(b) for b in rest], ctx.query_lens[num_seqs:],
                    ctx.checkpoints.seq_slots[num_seqs:],
                )  # fmt: skip
        self._records: list[_ConvRecord | _DeltaRuleRecord] = []
        self._verify_steps: list | None = None  # NOTE: the same for every layer: built at the first conv

    # ---- layer hooks -------------------------------------------------------------------------

    def conv(self, x: torch.Tensor, weight: torch.Tensor, conv_state: torch.Tensor, activation: str | None) -> torch.Tensor:
        """``causal_conv1d_fn`` over the batch; verify rows read their window without writing it."""
        n = self.num_tokens
        window = conv_state.index_select(0, self.state_indices.long())  # [V, L, D], a copy
        if _conv_steps(x):
            y = x.new_empty((n, x.shape[1]))
            if self._verify_steps is None:
                self._verify_steps = list(self._steps(self.query_lens, self._local))
            for tokens, rows in self._verify_steps:
                y[tokens] = causal_conv1d_update(x[tokens], weight, window, rows, activation)
        else:
            y = causal_conv1d_fn(x[:n], weight, window, self.cu_seqlens, self._local, self._ones, activation)
        self._records.append(_ConvRecord(conv_state, weight, x[:n]))
        if not self.has_rest:
            return y
        rest = causal_conv1d_fn(
            x[n:], weight, conv_state, self.rest_cu_seqlens, self.rest_state_indices, self.rest_has_initial_state,
            activation, self.rest_checkpoints,
        )  # fmt: skip
        return torch.cat([y, rest])

    def delta_rule(
        self, chunked_op: ChunkedOp, inputs: tuple[torch.Tensor, ...], recurrent_state: torch.Tensor, **kwargs
    ) -> torch.Tensor:
        """The delta rule over the batch: verify rows from their slots without storing, the other rows
        through ``chunked_op(*inputs, recurrent_state, cu_seqlens, state_indices, has_initial_state)``."""
        n = self.num_tokens
        verify_inputs = tuple(t[:n] for t in inputs)
        o = recurrent_delta_rule_varlen(
            *verify_inputs, recurrent_state, self.cu_seqlens, self.state_indices, store_final_state=False, **kwargs
        )
        self._records.append(_DeltaRuleRecord(recurrent_state, verify_inputs, kwargs))
        if not self.has_rest:
            return o
        rest = chunked_op(
            *(t[n:] for t in inputs), recurrent_state,
            self.rest_cu_seqlens, self.rest_state_indices, self.rest_has_initial_state,
            checkpoints=self.rest_checkpoints, **kwargs,
        )  # fmt: skip
        return torch.cat([o, rest])

    # ---- commit ------------------------------------------------------------------------------

    def commit(self, num_accepted_tokens: list[int]) -> None:
        """Replay the first ``num_accepted_tokens[i]`` inputs of verify row ``i`` into its slot, in every layer.

        ``0`` leaves row ``i``'s slot untouched (an aborted sequence); at most ``query_lens[i]``. The inputs
        stay (a captured batch's are static tensors, committed after every replay).
        """
        if len(num_accepted_tokens) != self.num_seqs:
            raise ValueError(f"num_accepted_tokens has {len(num_accepted_tokens)} entries, expected {self.num_seqs}")
        for i, (n, length) in enumerate(zip(num_accepted_tokens, self.query_lens)):
            if not 0 <= n <= length:
                raise ValueError(f"num_accepted_tokens[{i}] = {n} must be in 0..{length} (the row's verify tokens)")
        records = self._records
        rows = self._select(num_accepted_tokens)
        if rows is None:
            return
        ones = self._ones[: len(rows.lengths)]

        def kept(t: torch.Tensor) -> torch.Tensor:
            return t if rows.tokens is None else t[rows.tokens]

        steps = None  # NOTE: the same for every conv layer: built once
        for record in records:
            if isinstance(record, _DeltaRuleRecord):
                inputs = tuple(kept(t) for t in record.inputs)
                recurrent_delta_rule_varlen(*inputs, record.recurrent_state, rows.cu_seqlens, rows.state_indices,
                                            store_final_state=True, **record.kwargs)  # fmt: skip
            elif _conv_steps(record.inputs):
                inputs = kept(record.inputs)
                if steps is None:
                    steps = list(self._steps(rows.lengths, rows.state_indices))
                for tokens, slots in steps:
                    causal_conv1d_update(inputs[tokens], record.weight, record.conv_state, slots, None)
            else:
                causal_conv1d_fn(kept(record.inputs), record.weight, record.conv_state, rows.cu_seqlens,
                                 rows.state_indices, ones, None)  # fmt: skip

    def commit_on_device(self, num_accepted_tokens: torch.Tensor) -> None:
        """:meth:`commit` with the counts ``[num_seqs]`` int32 on the device: no host list, no sync, fixed shapes
        (what a CUDA graph captures). Each row runs as two: its accepted tokens into its slot, the rest into
        the null slot 0 (padding, whose contents nothing reads), so the kernels see the rows as they lie.
        """
        lengths = self.cu_seqlens[1:] - self.cu_seqlens[:-1]
        accepted = num_accepted_tokens.to(lengths.dtype)
        split = torch.stack([accepted, lengths - accepted], dim=1).flatten()  # [2V]: kept, dropped, ...
        cu_seqlens = torch.cat([self.cu_seqlens[:1], split.cumsum(0).to(self.cu_seqlens.dtype)])
        slots = torch.stack([self.state_indices, torch.zeros_like(self.state_indices)], dim=1).flatten()
        ones = self._ones.repeat(2)
        for record in self._records:
            if isinstance(record, _DeltaRuleRecord):
                recurrent_delta_rule_varlen(*record.inputs, record.recurrent_state, cu_seqlens, slots,
                                            store_final_state=True, **record.kwargs)  # fmt: skip
            else:
                causal_conv1d_fn(record.inputs, record.weight, record.conv_state, cu_seqlens, slots, ones, None)

    def _select(self, num_tokens: list[int]) -> _Rows | None:
        """The first ``num_tokens[i]`` tokens of each row that keeps any."""
        keep = [i for i, n in enumerate(num_tokens) if n]
        if not keep:
            return None
        if list(num_tokens) == self.query_lens:  # NOTE: no gather of the inputs when every draft was accepted
            return _Rows(None, self.cu_seqlens, self.state_indices, list(self.query_lens))
        device = self.cu_seqlens.device
        tokens, cu, lengths = [], [0], []
        for i in keep:
            tokens.extend(range(self._starts[i], self._starts[i] + num_tokens[i]))
            cu.append(len(tokens))
            lengths.append(num_tokens[i])
        slots = self.state_indices if len(keep) == self.num_seqs else self.state_indices[host_to_device(keep, device)]
        return _Rows(host_to_device(tokens, device), host_to_device(cu, device, torch.int32), slots, lengths)

    def _steps(self, lengths: list[int], state_ids: torch.Tensor):
        """Per position ``t``: (indices of token ``t`` of each row that has one, those rows' ``state_ids``).

        Token indices count within the rows given (``lengths``), from 0, rows laid out back to back.
        """
        device = state_ids.device
        starts = [0]
        for n in lengths[:-1]:
            starts.append(starts[-1] + n)
        for t in range(max(lengths, default=0)):
            rows = [i for i, n in enumerate(lengths) if n > t]
            yield host_to_device([starts[i] + t for i in rows], device), state_ids[host_to_device(rows, device)]

