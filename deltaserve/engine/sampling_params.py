"""Per-request sampling settings, with vLLM's names and defaults."""

from __future__ import annotations

from dataclasses import dataclass

from deltaserve.structured.params import StructuredOutputsParams

# NOTE: the number of alternatives returned per token is capped as in vLLM's default
# (max_logprobs = 20), so that one request cannot make every step sort the whole vocabulary.
MAX_LOGPROBS = 20


@dataclass
class SamplingParams:
    """How one request is sampled and when it stops.

    - ``temperature == 0`` is greedy; ``top_k`` of ``-1`` or ``0`` and ``top_p == 1`` are off.
    - ``seed``: a per-request ``torch.Generator``, so a seeded request gives the same tokens whatever
      else is in its batch (sequence ``i`` of ``n`` uses ``seed + i``).
    - ``max_tokens=None`` generates up to ``max_model_len``; the engine clips ``max_tokens`` so that
      prompt plus output fit in ``max_model_len`` (finish reason ``"length"``).
    - ``stop``: strings that end the output; the text stops before them unless
      ``include_stop_str_in_output``. ``stop_token_ids`` and EOS (unless ``ignore_eos``) end it too.
    - ``logprobs``: ``None`` = none; ``k >= 0`` = the chosen token's logprob plus the top ``k``.
    - ``structured_outputs``: a grammar the output must match (JSON schema, regex, choice, EBNF);
      a dict is read as ``StructuredOutputsParams(**dict)``. EOS is allowed once the grammar ends.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    seed: int | None = None
    max_tokens: int | None = 16
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    structured_outputs: StructuredOutputsParams | None = None

    def __post_init__(self):
        if isinstance(self.structured_outputs, dict):
            try:
                self.structured_outputs = StructuredOutputsParams(**self.structured_outputs)
            except TypeError as exc:
                raise ValueError(f"structured_outputs: {exc}") from None
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop) if self.stop is not None else []
        self.stop_token_ids = list(self.stop_token_ids) if self.stop_token_ids is not None else []
        self._check()

    def _check(self) -> None:
        def require(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(message)

        require(_is_int(self.n) and self.n >= 1, f"n must be an integer >= 1, got {self.n!r}")
        require(
            isinstance(self.temperature, (int, float)) and 0.0 <= self.temperature < float("inf"),
            f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature!r}",
        )
        require(
            isinstance(self.top_p, (int, float)) and 0.0 < self.top_p <= 1.0,
            f"top_p must be in (0, 1], got {self.top_p!r}",
        )
        require(
            _is_int(self.top_k) and self.top_k >= -1,
            f"top_k must be -1 or 0 (off) or an integer >= 1, got {self.top_k!r}",
        )
        require(self.seed is None or _is_int(self.seed), f"seed must be an integer or None, got {self.seed!r}")
        require(
            self.max_tokens is None or (_is_int(self.max_tokens) and self.max_tokens >= 1),
            f"max_tokens must be an integer >= 1 or None, got {self.max_tokens!r}",
        )
        require(
            all(isinstance(s, str) and s for s in self.stop),
            f"stop must be a non-empty string or a list of them, got {self.stop!r}",
        )
        require(
            all(_is_int(t) and t >= 0 for t in self.stop_token_ids),
            f"stop_token_ids must be non-negative integers, got {self.stop_token_ids!r}",
        )
        require(
            self.logprobs is None or (_is_int(self.logprobs) and 0 <= self.logprobs <= MAX_LOGPROBS),
            f"logprobs must be None or an integer in [0, {MAX_LOGPROBS}], got {self.logprobs!r}",
        )
        require(
            self.structured_outputs is None or isinstance(self.structured_outputs, StructuredOutputsParams),
            f"structured_outputs must be a StructuredOutputsParams, a dict or None, got "
            f"{type(self.structured_outputs).__name__}",
        )

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    @property
    def effective_top_k(self) -> int:
        """``top_k`` with ``-1`` and ``0`` both meaning off (returned as 0)."""
        return max(self.top_k, 0)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
