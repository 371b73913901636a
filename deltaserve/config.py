"""Engine settings, with vLLM's names where they exist."""

from __future__ import annotations

from dataclasses import dataclass, field

from deltaserve.spec_decode.config import SpeculativeConfig


@dataclass
class EngineConfig:
    """Settings of one engine instance; see ``LLM(**kwargs)``.

    ``num_state_slots`` and ``num_kv_blocks`` size the state pool and the paged KV cache; ``None``
    derives them from ``max_num_seqs`` and ``max_model_len`` (with prefix caching, the pool gets
    ``max_num_seqs`` more slots for state checkpoints).
    """

    model: str | None = None
    # Tokenizer directory (default: the model's); trust_remote_code lets transformers run a
    # checkpoint's own tokenizer code (Kimi's tiktoken tokenizer needs it).
    tokenizer: str | None = None
    trust_remote_code: bool = False
    dtype: str = "auto"
    device: str = "cpu"
    seed: int = 0
    max_model_len: int | None = None
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    block_size: int = 16
    num_kv_blocks: int | None = None
    num_state_slots: int | None = None
    cache_dtype: str = "auto"
    # Recurrent-state dtype of GDN layers (vLLM's name). "auto": the checkpoint config's
    # mamba_ssm_dtype where it names one, else float32 (a bfloat16 state loses accuracy at long
    # context); "bfloat16" is the opt-in. KDA states are float32 whatever this says.
    mamba_ssm_cache_dtype: str = "auto"
    enable_prefix_caching: bool = True
    # Prefix caching: token spacing of state checkpoints (a multiple of the chunked kernel's chunk,
    # 64; None = 256) and the memory budget of cached checkpoints and blocks (bytes; None = the
    # checkpoint slots plus the KV cache).
    # NOTE: prefills save these checkpoints inside the forward (the chunked delta rule has the state
    # at every 64-token boundary), so a fine interval costs no forward step; what is kept is chosen
    # by value per byte (deltaserve.kv.checkpoint_index). extra={"checkpoints_in_forward": False}
    # makes checkpoints end chunks instead (one forward step each; default interval = the chunk size).
    checkpoint_interval: int | None = None
    prefix_cache_budget_bytes: int | None = None
    tensor_parallel_size: int = 1
    # Speculative decoding, vLLM's dict: {"method": "ngram" | "mtp" | "synthetic",
    # "num_speculative_tokens": k, ...} (see deltaserve.spec_decode.config.SpeculativeConfig).
    speculative_config: dict | SpeculativeConfig | None = None
    # vLLM's async_scheduling: schedule and prepare the next step, and postprocess the last one, while
    # the device runs (deltaserve.engine.async_step). None: on for CUDA devices, off on the CPU; the
    # synchronous step is kept with MTP drafts or tensor_parallel_size > 1, and for the steps of a
    # speculative engine that may draft.
    async_scheduling: bool | None = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        self.speculative_config = SpeculativeConfig.from_dict(self.speculative_config)
        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        budget = self.prefix_cache_budget_bytes
        if budget is not None and (not isinstance(budget, int) or budget < 0):
            raise ValueError(f"prefix_cache_budget_bytes must be a non-negative integer or None, got {budget!r}")
        for name in ("max_model_len", "num_kv_blocks", "num_state_slots", "checkpoint_interval"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
        if self.async_scheduling is not None and not isinstance(self.async_scheduling, bool):
            raise ValueError(f"async_scheduling must be True, False or None, got {self.async_scheduling!r}")
        tp = self.tensor_parallel_size
        if not isinstance(tp, int) or isinstance(tp, bool) or tp < 1:
            raise ValueError(f"tensor_parallel_size must be a positive integer, got {tp!r}")
        spec = self.speculative_config
        if tp > 1 and spec is not None and spec.method == "mtp":
            # NOTE: the MTP head runs on rank 0 only, between steps; n-gram and synthetic drafts need no forward.
            raise ValueError(
                f"speculative_config method 'mtp' is not supported with tensor_parallel_size > 1 (got {tp}); "
                "use method 'ngram' under tensor parallelism"
            )
        if self.mamba_ssm_cache_dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(
                "mamba_ssm_cache_dtype must be one of auto, float32, bfloat16, float16; "
                f"got {self.mamba_ssm_cache_dtype!r}"
            )
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be one of auto, float32, bfloat16, float16; got {self.dtype!r}")
