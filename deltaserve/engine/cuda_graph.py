"""CUDA graphs for decode-only batches and speculative verify steps: one captured forward + logits per
padded batch size (and for verify steps the commit of the kept tokens).

A decode step launches hundreds of small kernels (27 layers x norms, projections, convs, KDA,
routing, grouped GEMMs); replaying them as one graph removes the per-launch CPU cost, which
otherwise dominates a small decode batch. As in vLLM, a batch of ``n`` sequences runs in the
graph of the smallest captured size ``>= n``; the padded rows use the null state slot 0,
``slot_mapping = -1`` (no KV write) and sequence length 0 (no KV read), so they touch nothing a
real sequence owns. Inputs are copied into static buffers on the device (device-to-device, no
host sync); the only sync of a step is the sampler reading the sampled tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from deltaserve.forward_context import ForwardContext, forward_context, host_to_device
from deltaserve.spec_decode.verify import VerifyBatch

CAPTURE_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)


@dataclass
class GraphForwardContext(ForwardContext):
    """A decode context whose ``seq_lens`` is a device tensor ``[B]`` int32 computed inside the graph.

    NOTE: the base class derives ``seq_lens`` from host lists, which would be frozen into the graph
    at capture; MLA's paged attention accepts a device tensor instead and reads it at replay.
    """

    seq_lens_tensor: torch.Tensor | None = None

    @property
    def seq_lens(self) -> torch.Tensor:  # type: ignore[override]
        return self.seq_lens_tensor


def capture_sizes(max_num_seqs: int, sizes: tuple[int, ...] = CAPTURE_SIZES) -> list[int]:
    """The sizes below ``max_num_seqs`` plus the first one that holds it (all of them if none does)."""
    chosen = [s for s in sizes if s < max_num_seqs]
    larger = [s for s in sizes if s >= max_num_seqs]
    return chosen + larger[:1]


class DecodeGraphs:
    """Static input buffers and one graph per padded batch size for ``model`` (bound to its caches).

    ``tokens_per_seq = 1``: decode steps. ``tokens_per_seq = 1 + k``: speculative verify steps, every
    row a verify row with up to ``1 + k`` tokens laid out at ``tokens_per_seq`` strides (a row with fewer
    drafts is padded, see :meth:`run`); the forward runs under a :class:`VerifyBatch` kept per size, and
    the commit of the accepted tokens (:meth:`commit`) is captured too, its counts read from a static
    device buffer.

    ``use_graphs=False`` runs the same padded static-buffer forward eagerly (any device): the
    bookkeeping of padding is then testable on the CPU.
    """

    def __init__(
        self,
        model,
        *,
        max_num_seqs: int,
        max_model_len: int,
        block_size: int,
        device: torch.device,
        use_graphs: bool = True,
        sizes: tuple[int, ...] = CAPTURE_SIZES,
        tokens_per_seq: int = 1,
    ):
        if tokens_per_seq < 1:
            raise ValueError(f"tokens_per_seq must be >= 1, got {tokens_per_seq}")
        self.model = model
        self.device = torch.device(device)
        self.use_graphs = use_graphs
        self.sizes = capture_sizes(max_num_seqs, sizes)
        self.max_batch = max(self.sizes)
        self.block_size = block_size
        self.tokens_per_seq = tps = tokens_per_seq
        # NOTE: a padded verify row's filler tokens sit up to k positions past the sequence's end.
        self.max_blocks = -(-(max_model_len + tps - 1) // block_size)
        n = self.max_batch

        def buffer(fill: int, dtype: torch.dtype, *shape: int) -> torch.Tensor:
            return torch.full(shape or (n,), fill, dtype=dtype, device=self.device)

        self.input_ids = buffer(0, torch.int64, n * tps)
        # NOTE: -1 marks a padded row: its sequence length (last position + 1) is 0.
        self.positions = buffer(-1, torch.int64, n * tps)
        self.state_indices = buffer(0, torch.int32)
        self.slot_mapping = buffer(-1, torch.int64, n * tps)
        self.block_tables = buffer(0, torch.int32, n, self.max_blocks)
        self.cu_seqlens = torch.arange(n + 1, dtype=torch.int32, device=self.device) * tps
        self.has_initial_state = buffer(1, torch.bool)
        # Verify steps: tokens each row keeps (the commit's input, 0 for padded rows).
        self.num_accepted_tokens = buffer(0, torch.int32)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        self.verify: dict[int, VerifyBatch] = {}
        self.commit_graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.pending: PaddedVerify | None = None  # the last verify run, until its commit

    # ---- capture -----------------------------------------------------------------------------

    def _forward(self, batch: int) -> tuple[torch.Tensor, VerifyBatch | None]:
        """The padded forward of the first ``batch`` static rows: float32 logits ``[batch * tokens_per_seq,
        vocab]`` (every token) and, for verify steps, the :class:`VerifyBatch` holding what the commit replays."""
        tps = self.tokens_per_seq
        positions = self.positions[: batch * tps]
        ctx = GraphForwardContext(
            cu_seqlens=self.cu_seqlens[: batch + 1],
            query_lens=[tps] * batch,
            # NOTE: host placeholders: they only mark every row as continuing a sequence (> 0).
            num_computed_tokens=[1] * batch,
            state_indices=self.state_indices[:batch],
            has_initial_state=self.has_initial_state[:batch],
            block_tables=self.block_tables[:batch],
            slot_mapping=self.slot_mapping[: batch * tps],
            block_size=self.block_size,
            seq_lens_tensor=(positions.view(batch, tps)[:, -1] + 1).to(torch.int32),
        )
        if tps > 1:
            ctx.spec_decode = VerifyBatch(ctx, batch)
        with forward_context(ctx):
            hidden = self.model(self.input_ids[: batch * tps], positions.clamp(min=0))
        return self.model.compute_logits(hidden), ctx.spec_decode

    @torch.inference_mode()
    def capture(self, pool=None):
        """Warm up (compile, autotune) and capture every size, largest first, in ``pool`` (a new one if None;
        returned, so that other graphs can share it)."""
        if not self.use_graphs:
            return pool
        pool = torch.cuda.graph_pool_handle() if pool is None else pool
        for batch in sorted(self.sizes, reverse=True):
            _, verify = self._forward(batch)
            if verify is not None:
                verify.commit_on_device(self.num_accepted_tokens[:batch])
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.logits[batch], verify = self._forward(batch)
            self.graphs[batch] = graph
            if verify is not None:
                # NOTE: the commit reads the inputs this graph's forward keeps in `verify` (static tensors).
                self.verify[batch] = verify
                commit = torch.cuda.CUDAGraph()
                with torch.cuda.graph(commit, pool=pool):
                    verify.commit_on_device(self.num_accepted_tokens[:batch])
                self.commit_graphs[batch] = commit
        torch.cuda.synchronize(self.device)
        return pool

    # ---- replay ------------------------------------------------------------------------------

    def can_run(self, ctx: ForwardContext, num_sampled: int, num_verify: int = 0) -> bool:
        """A batch that fits the largest size and whose tables fit: decode graphs take decode-only batches that
        sample every row; verify graphs take decode batches whose first rows verify 1..k drafts each."""
        width = 0 if ctx.block_tables is None else ctx.block_tables.shape[1]
        if not (0 < ctx.num_seqs <= self.max_batch and width <= self.max_blocks and ctx.checkpoints is None):
            return False
        if self.tokens_per_seq == 1:
            return num_verify == 0 and num_sampled == ctx.num_seqs and ctx.is_decode_only
        # NOTE: rows after the verify rows are decodes without drafts (one token, sampled, always committed).
        lens = ctx.query_lens
        return (
            0 < num_verify
            and num_sampled == ctx.num_seqs - num_verify
            and all(1 < n <= self.tokens_per_seq for n in lens[:num_verify])
            and all(n == 1 for n in lens[num_verify:])
            and all(c > 0 for c in ctx.num_computed_tokens)
        )

    def padded_size(self, num_seqs: int) -> int:
        return min(s for s in self.sizes if s >= num_seqs)

    @torch.inference_mode()
    def run(
        self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext, num_verify: int = 0
    ) -> torch.Tensor:
        """Logits ``[T, vocab]`` float32 of the batch's ``T`` tokens (a decode batch: one per sequence), in the
        batch's flat order; a view of a static buffer that the next call overwrites. After a verify step
        (``num_verify`` rows verify drafts, the others decode one token), :attr:`pending` commits the kept
        tokens: the accepted ones of the verify rows, the one token of the others.

        A row with fewer than ``k`` drafts (none, for a decode row) is padded with filler tokens after its
        own: the linear layers run a row's tokens in order and commit only the kept ones, and attention is
        causal, so the filler changes nothing the row keeps; it writes no KV (``slot_mapping = -1``) and its
        logits are dropped. The row's sequence length counts the filler, so that each real token's position
        (sequence length minus the tokens after it) is right; the filler's reads of KV past the row's blocks
        read some valid block (tables clamped to >= 0) and are discarded.
        """
        n = ctx.num_seqs
        batch = self.padded_size(n)
        tps = self.tokens_per_seq
        self.state_indices[:n].copy_(ctx.state_indices)
        if ctx.block_tables is not None:
            self.block_tables[:n, : ctx.block_tables.shape[1]].copy_(ctx.block_tables)
        index = None
        if all(q == tps for q in ctx.query_lens):
            self.input_ids[: n * tps].copy_(input_ids)
            self.positions[: n * tps].copy_(positions)
            self.slot_mapping[: n * tps].copy_(ctx.slot_mapping)
        else:
            # Row i's tokens at i * tps ..; positions continue past the row's end for the filler.
            rows = [(i * tps, q) for i, q in enumerate(ctx.query_lens)]
            index = host_to_device([start + j for start, q in rows for j in range(q)], self.device)
            padded = [c + j for c in ctx.num_computed_tokens for j in range(tps)]
            self.positions[: n * tps].copy_(host_to_device(padded, self.device))
            self.input_ids[: n * tps].zero_().index_copy_(0, index, input_ids)
            self.slot_mapping[: n * tps].fill_(-1).index_copy_(0, index, ctx.slot_mapping)
            self.block_tables[:n].clamp_(min=0)
        if batch > n:
            # NOTE: rows n..batch may hold a sequence of an earlier step: point them at nothing.
            self.positions[n * tps : batch * tps].fill_(-1)
            self.state_indices[n:batch].zero_()
            self.slot_mapping[n * tps : batch * tps].fill_(-1)
        if self.use_graphs and batch in self.graphs:
            self.graphs[batch].replay()
            logits, verify = self.logits[batch], self.verify.get(batch)
        else:
            logits, verify = self._forward(batch)
        if verify is not None:
            self.pending = PaddedVerify(self, verify, list(ctx.query_lens), num_verify, batch)
        return logits[: n * tps] if index is None else logits[index]

    @torch.inference_mode()
    def commit(self, verify: VerifyBatch, num_accepted_tokens: list[int], batch: int) -> None:
        """Replay the first ``num_accepted_tokens[i]`` tokens of verify row ``i`` into its slot (padded rows: 0)."""
        counts = list(num_accepted_tokens) + [0] * (batch - len(num_accepted_tokens))
        self.num_accepted_tokens[:batch].copy_(host_to_device(counts, self.device, torch.int32))
        if self.use_graphs and batch in self.commit_graphs:
            self.commit_graphs[batch].replay()
        else:
            verify.commit_on_device(self.num_accepted_tokens[:batch])


@dataclass
class PaddedVerify:
    """The rows of one verify graph step, with :meth:`VerifyBatch.commit`'s interface for its ``num_verify``
    verify rows; the decode rows after them keep their one token, the padded rows none."""

    graphs: DecodeGraphs
    verify: VerifyBatch
    query_lens: list[int]
    num_verify: int
    batch: int

    def commit(self, num_accepted_tokens: list[int]) -> None:
        if len(num_accepted_tokens) != self.num_verify:
            raise ValueError(f"num_accepted_tokens has {len(num_accepted_tokens)} entries, expected {self.num_verify}")
        for i, (n, length) in enumerate(zip(num_accepted_tokens, self.query_lens)):
            if not 0 <= n <= length:
                raise ValueError(f"num_accepted_tokens[{i}] = {n} must be in 0..{length} (the row's verify tokens)")
        decodes = len(self.query_lens) - self.num_verify
        self.graphs.commit(self.verify, list(num_accepted_tokens) + [1] * decodes, self.batch)


def make_cuda_graphs(model, config, device: torch.device) -> tuple[DecodeGraphs | None, DecodeGraphs | None]:
    """The runner's graphs for a CUDA device, captured now in one memory pool: decode steps, and with a
    ``speculative_config`` verify steps of ``1 + k`` tokens per row (``(decode, None)`` without one).
    ``(None, None)`` on the CPU or with ``extra={"enforce_eager": True}`` in the engine config."""
    if device.type != "cuda" or config.extra.get("enforce_eager", False):
        return None, None

    def graphs(max_num_seqs: int, tokens_per_seq: int) -> DecodeGraphs:
        return DecodeGraphs(
            model, max_num_seqs=max_num_seqs, max_model_len=config.max_model_len, block_size=config.block_size,
            device=device, tokens_per_seq=tokens_per_seq,
        )  # fmt: skip

    verify = None
    spec = config.speculative_config
    if spec is not None:
        # NOTE: a step drafts only while at most disable_by_batch_size sequences run; captured first, the
        # larger graphs. (max_num_spec_seqs does not bound it: the other rows of the step decode beside them.)
        rows = min(config.max_num_seqs, spec.disable_by_batch_size or config.max_num_seqs)
        verify = graphs(rows, 1 + spec.num_speculative_tokens)
    pool = verify.capture() if verify is not None else None
    decode = graphs(config.max_num_seqs, 1)
    decode.capture(pool)
    return decode, verify
