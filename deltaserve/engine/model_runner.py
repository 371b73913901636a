"""Runs one scheduled batch through the model: the only place that knows the device.

It owns the model, the state pool and the paged KV cache (bound to the model once), turns a
:class:`ScheduledBatch` into :class:`StepInputs` (host lists), those into a :class:`ForwardContext`
plus flat ``input_ids`` / ``positions``, computes logits only at the last new token of sequences
that sample, and samples. Under tensor parallelism every rank has a runner over its shards: rank 0's
sends each step's inputs (with the cache writes made since the last step) to the other ranks in one
broadcast (``step_sender``) and samples; the others run :meth:`ModelRunner.execute` on what they get.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field
from typing import Callable

import torch

from deltaserve.config import EngineConfig
from deltaserve.distributed.message_queue import min_over_ranks
from deltaserve.engine.cuda_graph import PaddedVerify, make_cuda_graphs
from deltaserve.engine.prompt_logprobs import collect_prompt_logprobs, prompt_logits, prompt_rows
from deltaserve.engine.sampler import DeviceSample, SampledToken, Sampler
from deltaserve.engine.scheduler import ScheduledBatch
from deltaserve.forward_context import ForwardContext, forward_context, host_to_device, make_forward_context
from deltaserve.spec_decode.mtp import StepOutputs
from deltaserve.spec_decode.speculator import Speculator
from deltaserve.spec_decode.structured import mask_verify_logits
from deltaserve.spec_decode.verify import VerifyBatch
from deltaserve.state.cache_ops import CacheOp, CacheOps
from deltaserve.state.pool import StatePool

# NOTE: a default that fits a laptop; the model's own limit (1M tokens for Kimi Linear) would make
# the default KV cache absurd. Pass max_model_len to go higher.
DEFAULT_MAX_MODEL_LEN = {"cpu": 4096, "cuda": 32768}
# Default KV cache size when num_kv_blocks is not given (bytes, CPU) / share of free memory (GPU).
DEFAULT_CPU_KV_BYTES = 1 << 30
DEFAULT_GPU_KV_FRACTION = 0.8
# Tokens between prefix-cache checkpoints taken inside the forward (a multiple of the chunk size 64).
DEFAULT_CHECKPOINT_INTERVAL = 256


def checkpoints_in_forward(config: EngineConfig) -> bool:
    """Whether prefill forwards save prefix-cache checkpoints without ending a chunk.

    NOTE: the one place that chooses; ``extra={"checkpoints_in_forward": False}`` ends chunks at
    checkpoints instead (one forward step each), the behaviour before in-forward capture.
    """
    return bool(config.extra.get("checkpoints_in_forward", True))


def resolve_cache_sizes(config: EngineConfig, hf_config, model, device: torch.device) -> EngineConfig:
    """Fill in ``max_model_len``, ``num_state_slots``, ``num_kv_blocks``, ``prefix_cache_budget_bytes``
    and ``checkpoint_interval`` (default: ``DEFAULT_CHECKPOINT_INTERVAL`` where the forward captures
    checkpoints, else ``max_num_batched_tokens``, where long prompts' chunks end anyway).

    With prefix caching the pool holds ``max_num_seqs`` slots for requests plus up to ``max_num_seqs``
    for checkpoints (fewer if ``prefix_cache_budget_bytes`` holds fewer); the default budget is those
    checkpoint slots plus the whole KV cache (the cache gives both back whenever a request needs them).
    """
    bs = config.block_size
    model_limit = getattr(hf_config.get_text_config(), "max_position_embeddings", None) or 1 << 20
    max_len = config.max_model_len
    if max_len is None:
        max_len = min(model_limit, DEFAULT_MAX_MODEL_LEN.get(device.type, 4096))
    elif max_len > model_limit:
        raise ValueError(f"max_model_len = {max_len} exceeds the model's max_position_embeddings = {model_limit}")
    slot_bytes = _pool_bytes(model, config, 0)  # one slot (the null slot's row)
    num_slots = config.num_state_slots
    if num_slots is None:
        num_checkpoint_slots = 0
        if config.enable_prefix_caching:
            num_checkpoint_slots = config.max_num_seqs
            if config.prefix_cache_budget_bytes is not None and slot_bytes > 0:
                num_checkpoint_slots = min(num_checkpoint_slots, config.prefix_cache_budget_bytes // slot_bytes)
        num_slots = config.max_num_seqs + num_checkpoint_slots
    kv_spec = model.kv_cache_spec(config.cache_dtype)
    block_bytes = kv_spec.bytes_per_block(bs)
    spec_config = config.speculative_config
    if spec_config is not None and spec_config.method == "mtp" and kv_spec.num_layers:
        block_bytes += block_bytes // kv_spec.num_layers  # NOTE: the MTP head's own attention layer
    num_blocks = config.num_kv_blocks
    if num_blocks is None:
        per_block = max(1, block_bytes)
        if device.type == "cuda":
            budget = int(torch.cuda.mem_get_info(device)[0] * DEFAULT_GPU_KV_FRACTION)
            budget -= _pool_bytes(model, config, num_slots)
        else:
            budget = DEFAULT_CPU_KV_BYTES
        wanted = config.max_num_seqs * -(-max_len // bs)
        num_blocks = max(1, min(wanted, budget // per_block))
    capacity = num_blocks * bs
    if capacity < max_len:
        if config.max_model_len is not None:
            raise ValueError(
                f"max_model_len = {max_len} tokens does not fit the KV cache: num_kv_blocks = {num_blocks} "
                f"x block_size = {bs} holds {capacity} tokens"
            )
        # NOTE: a derived length shrinks to what the cache holds, so any admitted request can finish.
        max_len = capacity
    budget = config.prefix_cache_budget_bytes
    if budget is None:
        budget = max(0, num_slots - config.max_num_seqs) * slot_bytes + block_bytes * num_blocks
    interval = config.checkpoint_interval
    if interval is None:
        interval = DEFAULT_CHECKPOINT_INTERVAL if checkpoints_in_forward(config) else config.max_num_batched_tokens
    return dataclasses.replace(
        config, max_model_len=max_len, num_state_slots=num_slots, num_kv_blocks=num_blocks,
        prefix_cache_budget_bytes=budget, checkpoint_interval=interval,
    )


def _pool_bytes(model, config: EngineConfig, num_slots: int) -> int:
    groups = model.state_groups(
        tp_size=config.tensor_parallel_size,
        cache_dtype=config.cache_dtype,
        mamba_ssm_cache_dtype=config.mamba_ssm_cache_dtype,
        **_layout_kwargs(config),
    )
    return sum(g.num_layers * (num_slots + 1) * g.layout.bytes_per_slot for g in groups.values())


def _layout_kwargs(config: EngineConfig) -> dict:
    """``extra={"conv_layout": "DS"}`` keeps the conv states ``(dim, state_len)`` (default SD)."""
    layout = config.extra.get("conv_layout", "SD")
    return {} if layout == "SD" else {"conv_layout": layout}


@dataclass
class StepInputs:
    """One step's work, as host lists: all a TP rank needs to run the forward (it travels pickled).

    ``sample_ends``: for each sequence that samples (verify rows aside), the flat token offset just
    past its new tokens. ``num_verify_seqs``: the first rows verify drafts (logits at all their tokens).
    ``prompt_rows``: flat rows whose logits score the prompt (prompt logprobs).
    ``checkpoints``: ``(offset, slot)`` pairs per sequence of the states the forward saves (or None).
    ``cache_ops``: the pool/KV writes made since the previous step, to replay first (other ranks).
    """

    input_ids: list[int]
    positions: list[int]
    query_lens: list[int]
    num_computed_tokens: list[int]
    state_slots: list[int]
    block_tables: list[list[int]]
    sample_ends: list[int]
    num_verify_seqs: int = 0
    prompt_rows: list[int] = field(default_factory=list)
    checkpoints: list[list[tuple[int, int]]] | None = None
    cache_ops: list[CacheOp] = field(default_factory=list)


@dataclass
class TokenPatch:
    """Input ids that are still on the device (async scheduling): flat ``offsets`` of the step's
    ``input_ids`` take ``token_ids[i]`` (a device tensor: the previous step's sampled tokens)."""

    offsets: list[int]
    token_ids: torch.Tensor


@dataclass
class LaunchedStep:
    """A step queued on the device by :meth:`ModelRunner.launch`: ``sample`` holds the tokens of the
    batch's sampling rows ``rows`` (None when no row samples); ``tokens()`` waits for them."""

    rows: list[int]
    sample: DeviceSample | None
    num_seqs: int

    def tokens(self) -> list[SampledToken | None]:
        """A sampled token per sequence of the batch (None for rows that do not sample)."""
        out: list = [None] * self.num_seqs
        if self.sample is not None:
            for i, token in zip(self.rows, self.sample.tokens()):
                out[i] = token
        return out


class ModelRunner:
    """Model plus caches on one device (one TP rank); ``run(batch)`` is one forward and one sampling step."""

    def __init__(
        self,
        config: EngineConfig,
        model,
        hf_config,
        generator: torch.Generator | None = None,
        eos_token_ids: set[int] | None = None,
        step_sender: Callable[[StepInputs], None] | None = None,
    ):
        self.device = torch.device(config.device)
        self.model = model
        self.config = resolve_cache_sizes(config, hf_config, model, self.device)
        if config.tensor_parallel_size > 1 and config.num_kv_blocks is None:
            # NOTE: free memory differs between GPUs: every rank takes the smallest KV cache.
            num_blocks = min_over_ranks(self.config.num_kv_blocks)
            config = dataclasses.replace(config, num_kv_blocks=num_blocks)
            self.config = resolve_cache_sizes(config, hf_config, model, self.device)
        self.step_sender = step_sender
        groups = model.state_groups(
            tp_size=config.tensor_parallel_size,
            cache_dtype=self.config.cache_dtype,
            mamba_ssm_cache_dtype=self.config.mamba_ssm_cache_dtype,
            **_layout_kwargs(self.config),
        )
        self.state_pool = StatePool(groups, self.config.num_state_slots, device=self.device)
        spec = model.kv_cache_spec(self.config.cache_dtype)
        self.kv_cache = torch.zeros(
            (spec.num_layers, self.config.num_kv_blocks, self.config.block_size, spec.entry_dim),
            dtype=spec.dtype,
            device=self.device,
        )
        model.bind_caches(self.state_pool, self.kv_cache)
        # Rank 0 of a TP group logs its cache writes for the other ranks.
        self.cache_ops = CacheOps(
            self.state_pool, self.kv_cache, record=step_sender is not None, commit=self._commit_verified
        )
        self.sampler = Sampler(generator, eos_token_ids)
        self.speculator = None
        if self.config.speculative_config is not None:
            self.speculator = Speculator(
                self.config.speculative_config, self.sampler,
                max_num_seqs=self.config.max_num_seqs, max_model_len=self.config.max_model_len, runner=self,
            )  # fmt: skip
        self._pending_verify: VerifyBatch | PaddedVerify | None = None
        # A proposer that runs on the step's hidden states (MTP) gets them after each step.
        self._keep_hidden = self.speculator is not None and hasattr(self.speculator.proposer, "observe")
        self._last_step: StepOutputs | None = None
        self._hidden: torch.Tensor | None = None  # the last eager forward's hidden states, when kept
        # CUDA graphs of decode-only batches and of verify-only batches (with a speculative config); None on
        # the CPU or with extra={"enforce_eager": True}.
        # NOTE: not with MTP drafts: a replayed graph returns logits only, the MTP head needs the hidden states.
        self.cuda_graphs, self.verify_graphs = (None, None) if self._keep_hidden else make_cuda_graphs(
            model, self.config, self.device
        )

    def cache_shapes(self) -> dict[str, tuple[int, ...]]:
        """Shapes of this rank's pool tensors (``conv.<group>``, ``recurrent.<group>``) and KV cache."""
        shapes = {f"conv.{name}": tuple(t.shape) for name, t in self.state_pool.conv.items()}
        shapes.update(
            {f"recurrent.{name}": tuple(t.shape) for name, t in self.state_pool.recurrent.items() if t is not None}
        )
        shapes["kv_cache"] = tuple(self.kv_cache.shape)
        return shapes

    def step_inputs(self, batch: ScheduledBatch) -> StepInputs:
        """The host lists of ``batch``: flat token ids and positions, per-sequence metadata.

        A verify row's tokens are its last sampled token and its drafts (``seq.spec_token_ids``).
        """
        num_verify = batch.num_verify_seqs
        drafts = batch.num_draft_tokens or [0] * len(batch)
        if any(n > 0 for n in drafts[num_verify:]):
            raise ValueError("verify rows (sequences with drafts) must be the first rows of the batch")
        input_ids: list[int] = []
        positions: list[int] = []
        for seq, num_new, num_drafts in zip(batch.seqs, batch.num_new_tokens, drafts):
            start = seq.num_computed_tokens
            input_ids.extend(seq.token_ids[start : start + num_new - num_drafts])
            input_ids.extend(seq.spec_token_ids[:num_drafts])
            positions.extend(range(start, start + num_new))
        return StepInputs(
            input_ids=input_ids,
            positions=positions,
            query_lens=list(batch.num_new_tokens),
            num_computed_tokens=[seq.num_computed_tokens for seq in batch.seqs],
            state_slots=[seq.state_slot for seq in batch.seqs],
            # NOTE: the sequences' own lists, read (or pickled for the TP ranks) before the scheduler changes them.
            block_tables=[seq.block_table for seq in batch.seqs],
            sample_ends=_ends(batch, _sampling_rows(batch)),
            num_verify_seqs=num_verify,
            prompt_rows=prompt_rows(batch),
            checkpoints=batch.checkpoints,
        )

    def prepare(self, inputs: StepInputs) -> tuple[torch.Tensor, torch.Tensor, ForwardContext]:
        """Flat ``input_ids`` / ``positions`` ``[T]`` int64 and the forward context of ``inputs``."""
        ctx = make_forward_context(
            inputs.query_lens,
            inputs.num_computed_tokens,
            inputs.state_slots,
            block_tables=inputs.block_tables,
            block_size=self.config.block_size,
            checkpoints=inputs.checkpoints,
            device=self.device,
        )

        return host_to_device(inputs.input_ids, self.device), host_to_device(inputs.positions, self.device), ctx

    @torch.inference_mode()
    def execute(
        self, inputs: StepInputs, batch: ScheduledBatch | None = None, patch: TokenPatch | None = None
    ) -> torch.Tensor | None:
        """The forward of one step: float32 logits ``[V + S, vocab]`` (every verify token, then each other
        sampling sequence's last token), or None. Verify rows' states wait for :meth:`commit_verified`.

        ``batch`` (rank 0): its sequences asking for prompt logprobs get this step's entries.
        ``patch``: input ids to take from the device (async scheduling), written before the forward.
        """
        input_ids, positions, ctx = self.prepare(inputs)
        if patch is not None and patch.offsets:
            input_ids.index_copy_(0, host_to_device(patch.offsets, self.device), patch.token_ids)
        num_verify = inputs.num_verify_seqs
        num_sampled = len(inputs.sample_ends)
        self._hidden = None
        # NOTE: every TP rank decides the same way from the same inputs, so their collectives match.
        graphs = self.verify_graphs if num_verify else self.cuda_graphs
        if not inputs.prompt_rows and graphs is not None and graphs.can_run(ctx, num_sampled, num_verify):
            logits = graphs.run(input_ids, positions, ctx, num_verify)  # [T, vocab]: each verify token, each decode
            if num_verify:
                self._pending_verify = graphs.pending
            return logits
        if num_verify:
            ctx.spec_decode = self._pending_verify = VerifyBatch(ctx, num_verify)
        with forward_context(ctx):
            hidden = self.model(input_ids, positions)  # [T, hidden]
        if self._keep_hidden:
            self._hidden = hidden
        if inputs.prompt_rows:
            if batch is not None:
                collect_prompt_logprobs(self.model, hidden, batch)
            else:
                # NOTE: a TP worker computes the same logits slices, so the vocabulary all-gathers match.
                for _ in prompt_logits(self.model, hidden, inputs.prompt_rows):
                    pass
        last = [*range(sum(inputs.query_lens[:num_verify])), *(end - 1 for end in inputs.sample_ends)]
        if not last:
            return None
        if len(last) < hidden.shape[0]:  # NOTE: rows are increasing, so all T of them need no gather
            hidden = hidden[host_to_device(last, self.device)]
        return self.model.compute_logits(hidden)  # float32

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> list[SampledToken | list[SampledToken] | None]:
        """Forward ``batch``; returns a sampled token per sequence that samples (a verify row: its
        accepted drafts and the target's next token), else None.

        Sequences asking for prompt logprobs get this chunk's entries appended (``prompt_logprobs``).
        """
        inputs = self.step_inputs(batch)
        if self.step_sender is not None:
            inputs.cache_ops = self.cache_ops.drain()
            self.step_sender(inputs)
        logits = self.execute(inputs, batch)
        self._last_step = None
        if self._hidden is not None:
            self._last_step = StepOutputs(batch, self._hidden, inputs.num_computed_tokens)
        out: list = [None] * len(batch)
        if logits is None:
            return out
        seqs, num_verify = batch.seqs, inputs.num_verify_seqs
        if num_verify:
            verify_tokens = sum(inputs.query_lens[:num_verify])
            verify_rows = range(num_verify)
            drafts = [seqs[i].spec_token_ids[: batch.num_draft_tokens[i]] for i in verify_rows]
            verify_logits = mask_verify_logits(logits[:verify_tokens], [seqs[i].structured for i in verify_rows], drafts)
            emitted = self.speculator.verify(
                verify_logits, drafts, [seqs[i].params for i in verify_rows], [seqs[i].generator for i in verify_rows]
            )
            for i, tokens in zip(verify_rows, emitted):
                out[i] = tokens
            logits = logits[verify_tokens:]
        rows = _sampling_rows(batch)
        if rows:
            sampled = self.sampler(logits, [seqs[i].params for i in rows], [seqs[i].generator for i in rows],
                                   structured=[seqs[i].structured for i in rows],
                                   histories=[seqs[i] for i in rows])  # fmt: skip
            for i, token in zip(rows, sampled):
                out[i] = token
        return out

    @torch.inference_mode()
    def launch(self, batch: ScheduledBatch, patch: TokenPatch | None = None,
               placeholder: int | None = None) -> LaunchedStep:
        """:meth:`run` without waiting for the device (async scheduling; no verify rows, TP 1): the
        forward and the sampler are queued and the sampled tokens' copy to the host is started.

        ``patch`` fills the input ids that are ``placeholder`` in the sequences' host token lists
        (each must be covered, else a RuntimeError: a placeholder would be fed to the model).
        """
        if batch.num_verify_seqs or self.step_sender is not None:
            raise RuntimeError("launch takes neither verify rows nor tensor-parallel steps: use run")
        inputs = self.step_inputs(batch)
        if placeholder is not None:
            found = inputs.input_ids.count(placeholder)
            if found != (len(patch.offsets) if patch is not None else 0):
                raise RuntimeError(f"{found} input ids are placeholders but {len(patch.offsets) if patch else 0} are patched")
        logits = self.execute(inputs, batch, patch)
        rows = _sampling_rows(batch)
        sample = None
        if logits is not None and rows:
            seqs = batch.seqs
            sample = self.sampler.sample(logits, [seqs[i].params for i in rows], [seqs[i].generator for i in rows],
                                         structured=[seqs[i].structured for i in rows],
                                         histories=[seqs[i] for i in rows]).start_copy()  # fmt: skip
        return LaunchedStep(rows, sample, len(batch))

    def commit_verified(self, num_accepted_tokens: list[int]) -> None:
        """After a verify step: make each verify row's states hold its first ``num_accepted_tokens[i]`` tokens.

        NOTE: a cache op, so that the other TP ranks commit the same tokens before the next forward.
        """
        self.cache_ops.commit_verified(num_accepted_tokens)

    def _commit_verified(self, num_accepted_tokens: list[int]) -> None:
        verify, self._pending_verify = self._pending_verify, None
        if verify is None:
            raise RuntimeError("commit_verified without a verify step")
        verify.commit(num_accepted_tokens)

    def propose_drafts(self, seqs: list, block_manager=None) -> None:
        """Drafts for the next step of each sequence that decodes (nothing without speculative_config)."""
        if self.speculator is not None:
            step, self._last_step = self._last_step, None
            self.speculator.propose(seqs, step, block_manager)


def _sampling_rows(batch: ScheduledBatch) -> list[int]:
    """The rows that sample one token (verify rows aside): ``sample_ends``' sequences, in order."""
    num_verify = batch.num_verify_seqs
    return [i for i, sample in enumerate(batch.do_sample) if sample and i >= num_verify]


def _ends(batch: ScheduledBatch, rows: list[int]) -> list[int]:
    """Token offset just past each selected sequence's new tokens in the flat batch."""
    ends = list(itertools.accumulate(batch.num_new_tokens))
    return [ends[i] for i in rows]
