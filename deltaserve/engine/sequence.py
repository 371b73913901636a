"""One generated sequence: its tokens, its progress through the cache, and its resources."""

from __future__ import annotations

import enum

import torch

from deltaserve.engine.outputs import Logprob
from deltaserve.engine.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    """Prompt plus generated tokens of one of a request's ``n`` sequences.

    ``num_computed_tokens`` tokens are in the state slot and the KV blocks; the next forward feeds
    ``token_ids[num_computed_tokens:]`` (a whole or chunked prefill, or one decode token).
    Preemption by recompute resets it to 0 and keeps the generated tokens, which are then
    recomputed as if they were prompt.
    """

    def __init__(
        self,
        seq_id: int,
        request_id: str,
        index: int,
        prompt_token_ids: list[int],
        params: SamplingParams,
        max_tokens: int,
        generator: torch.Generator | None = None,
    ):
        self.seq_id = seq_id
        self.request_id = request_id
        self.index = index
        self.token_ids: list[int] = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.num_computed_tokens = 0
        self.params = params
        # NOTE: the clipped budget (prompt + output <= max_model_len), not params.max_tokens.
        self.max_tokens = max_tokens
        self.generator = generator
        self.status = SequenceStatus.WAITING
        self.state_slot: int | None = None
        self.block_table: list[int] = []
        self.num_preemptions = 0
        # Speculative decoding: drafts for the next step (not in token_ids until accepted) and counters.
        self.spec_token_ids: list[int] = []
        self.num_draft_tokens = 0
        self.num_accepted_tokens = 0
        # Prompt tokens restored from the prefix cache when first admitted (None before that).
        self.num_cached_tokens: int | None = None
        # Output bookkeeping.
        self.cumulative_logprob = 0.0
        self.logprobs: list[dict[int, Logprob]] | None = [] if params.logprobs is not None else None
        # NOTE: one entry per prompt token, the first None (nothing scores it); sequence 0 of a
        # request collects them for all n (see engine/prompt_logprobs.py).
        self.prompt_logprobs_decoded = False
        self.prompt_logprobs: list[dict[int, Logprob] | None] | None = (
            [None] if params.prompt_logprobs is not None and index == 0 else None)
        self.output_text = ""
        # With logprobs: where each output token's text starts in output_text (its length when the
        # token was appended; a token completing a held-back character shares its start).
        self.text_offsets: list[int] | None = [] if params.logprobs is not None else None
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None
        # Incremental detokenisation offsets (see engine/detokenizer.py).
        self.prefix_offset = 0
        self.read_offset = 0
        self.detok_done = 0
        # The grammar matcher of a request with structured_outputs (see deltaserve/structured/).
        self.structured = None
        self.structured_rejected_token: int | None = None

    # ---- sizes -------------------------------------------------------------------------------

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_prefill(self) -> bool:
        """More than the last sampled token is still to be computed (a prompt or a recompute)."""
        return self.num_uncomputed_tokens > 1 or self.num_computed_tokens == 0

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    def append_token(self, token_id: int, logprob: float, top: dict[int, Logprob] | None) -> None:
        self.token_ids.append(token_id)
        # NOTE: the matcher advances with every token the sequence keeps, wherever it was sampled.
        if self.structured is not None and not self.structured.accept(token_id):
            self.structured_rejected_token = token_id
        self.cumulative_logprob += logprob
        if self.logprobs is not None:
            self.logprobs.append(top or {})
            self.text_offsets.append(len(self.output_text))

    def __repr__(self) -> str:
        return (
            f"Sequence(id={self.seq_id}, request={self.request_id!r}, tokens={self.num_tokens}, "
            f"computed={self.num_computed_tokens}, status={self.status.value}, slot={self.state_slot}, "
            f"blocks={len(self.block_table)})"
        )
