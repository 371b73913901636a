"""``speculative_config``: the settings of speculative decoding, with vLLM's names.

``LLM(speculative_config={"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 4})``,
``--speculative-config '{"method": "ngram", ...}'`` on the CLI and ``serve``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

METHODS = ("ngram", "mtp", "synthetic")
# NOTE: vLLM accepts the model-specific MTP names too; they all mean the checkpoint's own mtp.* layers.
METHOD_ALIASES = {"qwen3_next_mtp": "mtp", "qwen3_5_mtp": "mtp", "deepseek_mtp": "mtp"}


@dataclass(frozen=True)
class SpeculativeConfig:
    """One drafter and how many tokens it proposes per step.

    - ``method``: ``"ngram"`` (prompt lookup, any model), ``"mtp"`` (the checkpoint's ``mtp.*``
      layers, Qwen3-Next / Qwen3.5), ``"synthetic"`` (benchmarks: drafts that are accepted with a
      forced mean acceptance length, through the real verification path).
    - ``num_speculative_tokens``: ``k``, drafts per sequence and step (each step verifies ``1 + k``).
    - ``prompt_lookup_min`` / ``prompt_lookup_max``: n-gram sizes tried, longest first.
    - ``synthetic_acceptance_length``: mean tokens emitted per verify step, in ``[1, 1 + k]``.
    - ``disable_by_batch_size``: no drafts while more sequences than this run (None: never).
    - ``auto_disable``: stop drafting while the recent acceptance cannot pay for the verify tokens
      (probing again every ``auto_disable_probe_steps`` steps).
    - ``max_num_spec_seqs``: sequences that may verify drafts in one step (the verify scratch is
      sized for them; others run without drafts). None: ``max_num_seqs``.
    """

    method: str
    num_speculative_tokens: int
    prompt_lookup_min: int = 1
    prompt_lookup_max: int = 4
    synthetic_acceptance_length: float | None = None
    disable_by_batch_size: int | None = None
    auto_disable: bool = True
    auto_disable_min_accepted: float = 0.2
    auto_disable_probe_steps: int = 64
    max_num_spec_seqs: int | None = None
    seed: int = 0

    @classmethod
    def from_dict(cls, value: "dict | SpeculativeConfig | None") -> "SpeculativeConfig | None":
        """Parse ``speculative_config``; ValueError naming the field and its allowed range."""
        if value is None or isinstance(value, SpeculativeConfig):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"speculative_config must be a dict or None, got {type(value).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"speculative_config: unknown field(s) {unknown}; allowed: {sorted(known)}")
        if "method" not in value or "num_speculative_tokens" not in value:
            raise ValueError("speculative_config needs 'method' and 'num_speculative_tokens'")
        value = dict(value)
        value["method"] = METHOD_ALIASES.get(value["method"], value["method"])
        return cls(**value)

    def __post_init__(self):
        def require(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(f"speculative_config: {message}")

        def is_int(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        require(self.method in METHODS, f"method must be one of {METHODS}, got {self.method!r}")
        k = self.num_speculative_tokens
        require(is_int(k) and 1 <= k <= 16, f"num_speculative_tokens must be an integer in 1..16, got {k!r}")
        lo, hi = self.prompt_lookup_min, self.prompt_lookup_max
        require(is_int(lo) and lo >= 1, f"prompt_lookup_min must be an integer >= 1, got {lo!r}")
        require(is_int(hi) and hi >= lo, f"prompt_lookup_max must be an integer >= prompt_lookup_min = {lo}, got {hi!r}")
        length = self.synthetic_acceptance_length
        if self.method == "synthetic":
            require(
                isinstance(length, (int, float)) and 1.0 <= length <= 1 + k,
                f"synthetic_acceptance_length must be in [1, 1 + num_speculative_tokens = {1 + k}], got {length!r}",
            )
        else:
            require(length is None, "synthetic_acceptance_length is only for method 'synthetic'")
        size = self.disable_by_batch_size
        require(size is None or (is_int(size) and size >= 1), f"disable_by_batch_size must be >= 1 or None, got {size!r}")
        rows = self.max_num_spec_seqs
        require(rows is None or (is_int(rows) and rows >= 1), f"max_num_spec_seqs must be >= 1 or None, got {rows!r}")
        require(
            isinstance(self.auto_disable_min_accepted, (int, float)) and 0 <= self.auto_disable_min_accepted <= k,
            f"auto_disable_min_accepted must be in [0, {k}], got {self.auto_disable_min_accepted!r}",
        )
        probe = self.auto_disable_probe_steps
        require(is_int(probe) and probe >= 1, f"auto_disable_probe_steps must be an integer >= 1, got {probe!r}")
