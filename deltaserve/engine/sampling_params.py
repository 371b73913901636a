"""Per-request sampling settings, with vLLM's names and defaults, each bounded where it is set."""

from __future__ import annotations

import math
from dataclasses import dataclass

from deltaserve.structured.params import StructuredOutputsParams

# NOTE: the number of alternatives returned per token is capped as in vLLM's default
# (max_logprobs = 20), so that one request cannot make every step sort the whole vocabulary.
MAX_LOGPROBS = 20
MAX_N = 128
# A temperature below this samples as greedy (vLLM's _SAMPLING_EPS): dividing by 1e-40 overflows to
# inf/nan logits, and the draw then lands on token 0 for ever.
MIN_TEMPERATURE = 1e-5
MAX_TEMPERATURE = 100.0
# Integer settings stay within int32 (they become torch tensors; top_k above the vocabulary is off).
MAX_INT32 = 2**31 - 1
MIN_SEED, MAX_SEED = -(2**63), 2**64 - 1
MAX_STOP_STRINGS, MAX_STOP_STRING_CHARS = 16, 256
MAX_STOP_TOKEN_IDS, MAX_LOGIT_BIAS_ENTRIES = 1024, 1024
MAX_PENALTY, MAX_REPETITION_PENALTY, MAX_LOGIT_BIAS = 2.0, 10.0, 100.0


@dataclass
class SamplingParams:
    """How one request is sampled and when it stops.

    - ``temperature == 0`` (or below ``MIN_TEMPERATURE``) is greedy; ``top_k`` of ``-1`` or ``0``,
      ``top_p == 1`` and ``min_p == 0`` are off.
    - ``seed``: a per-request ``torch.Generator``, so a seeded request gives the same tokens whatever
      else is in its batch (sequence ``i`` of ``n`` uses ``(seed + i) mod 2**64``).
    - ``max_tokens=None`` generates up to ``max_model_len``; the engine clips ``max_tokens`` so that
      prompt plus output fit in ``max_model_len`` (finish reason ``"length"``). ``min_tokens``: EOS,
      ``stop_token_ids`` and stop strings do not end the output before that many tokens.
    - ``stop``: strings that end the output; the text stops before them unless
      ``include_stop_str_in_output``. ``stop_token_ids`` and EOS (unless ``ignore_eos``) end it too.
    - Penalties as vLLM applies them: ``repetition_penalty`` (> 1 discourages) on tokens of the prompt
      and the output; ``presence_penalty`` / ``frequency_penalty`` (OpenAI's, in [-2, 2]) on the
      output's tokens. ``logit_bias``: ``{token_id: bias in [-100, 100]}`` added to the logits.
    - ``logprobs``: ``None`` = none; ``k >= 0`` = the chosen token's logprob plus the top ``k``.
      ``prompt_logprobs``: the same for every prompt token (the first one's entry is ``None``).
    - ``structured_outputs``: a grammar the output must match (JSON schema, regex, choice, EBNF);
      a dict is read as ``StructuredOutputsParams(**dict)``. EOS is allowed once the grammar ends.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] | None = None
    logprobs: int | None = None
    prompt_logprobs: int | None = None
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
        if self.logit_bias is not None and not isinstance(self.logit_bias, dict):
            raise ValueError(f"logit_bias must be a dict of token id -> bias, got {type(self.logit_bias).__name__}")
        self.logit_bias = dict(self.logit_bias) if self.logit_bias else None
        self._check()

    def _check(self) -> None:
        def require(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(message)

        require(_is_int(self.n) and 1 <= self.n <= MAX_N, f"n must be an integer in [1, {MAX_N}], got {self.n!r}")
        require(_in(self.temperature, 0.0, MAX_TEMPERATURE),
                f"temperature must be a number in [0, {MAX_TEMPERATURE:g}] (0 = greedy), got {self.temperature!r}")
        require(_in(self.top_p, 0.0, 1.0) and self.top_p > 0, f"top_p must be in (0, 1], got {self.top_p!r}")
        require(_is_int(self.top_k) and -1 <= self.top_k <= MAX_INT32,
                f"top_k must be -1 or 0 (off) or an integer in [1, {MAX_INT32}], got {self.top_k!r}")
        require(_in(self.min_p, 0.0, 1.0), f"min_p must be in [0, 1], got {self.min_p!r}")
        require(self.seed is None or (_is_int(self.seed) and MIN_SEED <= self.seed <= MAX_SEED),
                f"seed must be None or an integer in [-2**63, 2**64 - 1], got {self.seed!r}")
        require(self.max_tokens is None or (_is_int(self.max_tokens) and 1 <= self.max_tokens <= MAX_INT32),
                f"max_tokens must be None or an integer in [1, {MAX_INT32}], got {self.max_tokens!r}")
        require(_is_int(self.min_tokens) and 0 <= self.min_tokens <= MAX_INT32,
                f"min_tokens must be an integer in [0, {MAX_INT32}], got {self.min_tokens!r}")
        require(self.max_tokens is None or self.min_tokens <= self.max_tokens,
                f"min_tokens must not exceed max_tokens ({self.max_tokens}), got {self.min_tokens}")
        require(len(self.stop) <= MAX_STOP_STRINGS and all(
            isinstance(s, str) and 0 < len(s) <= MAX_STOP_STRING_CHARS for s in self.stop),
            f"stop must be at most {MAX_STOP_STRINGS} non-empty strings of at most {MAX_STOP_STRING_CHARS} "
            f"characters, got {_short(self.stop)}")
        require(len(self.stop_token_ids) <= MAX_STOP_TOKEN_IDS and all(
            _is_int(t) and 0 <= t <= MAX_INT32 for t in self.stop_token_ids),
            f"stop_token_ids must be at most {MAX_STOP_TOKEN_IDS} non-negative token ids, got "
            f"{_short(self.stop_token_ids)}")
        require(_in(self.repetition_penalty, 0.0, MAX_REPETITION_PENALTY) and self.repetition_penalty > 0,
                f"repetition_penalty must be in (0, {MAX_REPETITION_PENALTY:g}] (1 = off), got "
                f"{self.repetition_penalty!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            require(_in(value, -MAX_PENALTY, MAX_PENALTY), f"{name} must be in [-2, 2], got {value!r}")
        bias = self.logit_bias or {}
        require(len(bias) <= MAX_LOGIT_BIAS_ENTRIES and all(
            _is_int(t) and 0 <= t <= MAX_INT32 and _in(b, -MAX_LOGIT_BIAS, MAX_LOGIT_BIAS) for t, b in bias.items()),
            f"logit_bias must map at most {MAX_LOGIT_BIAS_ENTRIES} token ids to biases in [-100, 100], got "
            f"{_short(bias)}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            require(value is None or (_is_int(value) and 0 <= value <= MAX_LOGPROBS),
                    f"{name} must be None or an integer in [0, {MAX_LOGPROBS}], got {value!r}")
        for name in ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens"):
            require(isinstance(getattr(self, name), bool), f"{name} must be a bool, got {getattr(self, name)!r}")
        require(
            self.structured_outputs is None or isinstance(self.structured_outputs, StructuredOutputsParams),
            f"structured_outputs must be a StructuredOutputsParams, a dict or None, got "
            f"{type(self.structured_outputs).__name__}",
        )

    @property
    def is_greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE or self.top_k == 1

    @property
    def effective_top_k(self) -> int:
        """``top_k`` with ``-1`` and ``0`` both meaning off (returned as 0)."""
        return max(self.top_k, 0)

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    @property
    def adjusts_logits(self) -> bool:
        """Penalties, ``min_tokens`` or ``logit_bias``: the sampler changes the logits (greedy too)."""
        return self.has_penalties or self.min_tokens > 0 or bool(self.logit_bias)

    def token_ids_in_use(self) -> list[int]:
        """Token ids the request names (``stop_token_ids``, ``logit_bias`` keys): checked against the vocabulary."""
        return list(self.stop_token_ids) + list(self.logit_bias or {})


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _in(value, low: float, high: float) -> bool:
    """A real number (not a bool), finite, in ``[low, high]``."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and low <= value <= high


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
