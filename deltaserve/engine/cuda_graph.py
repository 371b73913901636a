"""CUDA graphs for decode-only batches: one captured forward + logits per padded batch size.

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

from deltaserve.forward_context import ForwardContext, forward_context

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
    ):
        self.model = model
        self.device = torch.device(device)
        self.use_graphs = use_graphs
        self.sizes = capture_sizes(max_num_seqs, sizes)
        self.max_batch = max(self.sizes)
        self.block_size = block_size
        self.max_blocks = -(-max_model_len // block_size)
        n = self.max_batch

        def buffer(fill: int, dtype: torch.dtype, *shape: int) -> torch.Tensor:
            return torch.full(shape or (n,), fill, dtype=dtype, device=self.device)

        self.input_ids = buffer(0, torch.int64)
        # NOTE: -1 marks a padded row: its sequence length (position + 1) is 0.
        self.positions = buffer(-1, torch.int64)
        self.state_indices = buffer(0, torch.int32)
        self.slot_mapping = buffer(-1, torch.int64)
        self.block_tables = buffer(0, torch.int32, n, self.max_blocks)
        self.cu_seqlens = torch.arange(n + 1, dtype=torch.int32, device=self.device)
        self.has_initial_state = buffer(1, torch.bool)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}

    # ---- capture -----------------------------------------------------------------------------

    def _forward(self, batch: int) -> torch.Tensor:
        """The padded forward of the first ``batch`` static rows: float32 logits ``[batch, vocab]``."""
        positions = self.positions[:batch]
        ctx = GraphForwardContext(
            cu_seqlens=self.cu_seqlens[: batch + 1],
            query_lens=[1] * batch,
            # NOTE: host placeholders: they only mark the batch as decode-only (> 0).
            num_computed_tokens=[1] * batch,
            state_indices=self.state_indices[:batch],
            has_initial_state=self.has_initial_state[:batch],
            block_tables=self.block_tables[:batch],
            slot_mapping=self.slot_mapping[:batch],
            block_size=self.block_size,
            seq_lens_tensor=(positions + 1).to(torch.int32),
        )
        with forward_context(ctx):
            hidden = self.model(self.input_ids[:batch], positions.clamp(min=0))
        return self.model.compute_logits(hidden)

    @torch.inference_mode()
    def capture(self) -> None:
        """Warm up (compile, autotune) and capture every size, largest first, sharing one memory pool."""
        if not self.use_graphs:
            return
        pool = torch.cuda.graph_pool_handle()
        for batch in sorted(self.sizes, reverse=True):
            self._forward(batch)
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.logits[batch] = self._forward(batch)
            self.graphs[batch] = graph
        torch.cuda.synchronize(self.device)

    # ---- replay ------------------------------------------------------------------------------

    def can_run(self, ctx: ForwardContext, num_sampled: int) -> bool:
        """A decode-only batch that fits the largest size, samples every row, and whose tables fit."""
        width = 0 if ctx.block_tables is None else ctx.block_tables.shape[1]
        return (
            0 < ctx.num_seqs <= self.max_batch
            and num_sampled == ctx.num_seqs
            and ctx.is_decode_only
            and width <= self.max_blocks
        )

    def padded_size(self, num_seqs: int) -> int:
        return min(s for s in self.sizes if s >= num_seqs)

    @torch.inference_mode()
    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """Logits ``[B, vocab]`` float32 of a decode batch (one token per sequence); a view of a static
        buffer that the next call overwrites."""
        n = ctx.num_seqs
        batch = self.padded_size(n)
        self.input_ids[:n].copy_(input_ids)
        self.positions[:n].copy_(positions)
        self.state_indices[:n].copy_(ctx.state_indices)
        self.slot_mapping[:n].copy_(ctx.slot_mapping)
        if ctx.block_tables is not None:
            self.block_tables[:n, : ctx.block_tables.shape[1]].copy_(ctx.block_tables)
        if batch > n:
            # NOTE: rows n..batch may hold a sequence of an earlier step: point them at nothing.
            self.positions[n:batch].fill_(-1)
            self.state_indices[n:batch].zero_()
            self.slot_mapping[n:batch].fill_(-1)
        if self.use_graphs and batch in self.graphs:
            self.graphs[batch].replay()
            return self.logits[batch][:n]
        return self._forward(batch)[:n]


def make_decode_graphs(model, config, device: torch.device) -> DecodeGraphs | None:
    """The runner's graphs for a CUDA device (captured now), or None on the CPU or with
    ``extra={"enforce_eager": True}`` in the engine config."""
    if device.type != "cuda" or config.extra.get("enforce_eager", False):
        return None
    graphs = DecodeGraphs(
        model,
        max_num_seqs=config.max_num_seqs,
        max_model_len=config.max_model_len,
        block_size=config.block_size,
        device=device,
    )
    graphs.capture()
    return graphs
