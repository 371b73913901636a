"""What the engine returns, shaped like vLLM's ``RequestOutput``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple


class Logprob(NamedTuple):
    """Log-probability of one token at one position; ``rank`` 1 is the most likely token."""

    logprob: float
    rank: int
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    """One generated sequence of a request (``index`` in ``0..n-1``).

    ``finish_reason`` is ``None`` while running, then ``"stop"`` (EOS, a stop token id or string),
    ``"length"`` (``max_tokens`` or ``max_model_len``) or ``"abort"``; ``stop_reason`` is the stop
    string or stop token id that ended it (``None`` for EOS and length). With speculative decoding,
    ``num_draft_tokens`` drafts were verified for it and ``num_accepted_tokens`` of them accepted.
    """

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    # With logprobs: where each token's text starts in ``text`` (clipped to its length).
    text_offsets: list[int] | None = None
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """All sequences of one request so far; ``finished`` once every sequence has finished.

    ``num_cached_tokens``: prompt tokens restored from the prefix cache (vLLM's name; the first
    sequence's, at its first admission).
    """

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = False
    # With ``SamplingParams.prompt_logprobs``: one entry per prompt token (the first None), once computed.
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
    num_cached_tokens: int = 0

    @property
    def spec_decode_metrics(self) -> dict[str, int]:
        """Draft tokens verified and accepted over the request's sequences (vLLM's counter names)."""
        return {
            "num_draft_tokens": sum(o.num_draft_tokens for o in self.outputs),
            "num_accepted_tokens": sum(o.num_accepted_tokens for o in self.outputs),
        }
