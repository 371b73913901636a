"""Tensor-parallel test helpers: a tiny checkpoint whose head counts divide by 4, a logits tap."""

from __future__ import annotations

from pathlib import Path

from deltaserve.models.tiny import make_tiny

# NOTE: 4 KDA and 4 MLA heads (TP 1, 2, 4 divide them); vocab 330 does not divide by 4, so the last
# rank's vocabulary shard is padded.
TP_OVERRIDES = {"num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 330, "linear_attn_config": {"num_heads": 4}}


def make_tp_checkpoint(path: Path) -> Path:
    return make_tiny(Path(path) / "tiny-tp", seed=1, overrides=TP_OVERRIDES)


class LogitsTap:
    """Wraps a runner's sampler and keeps a copy of the float32 logits of every step."""

    def __init__(self, sampler):
        self.sampler = sampler
        self.logits = []

    def __call__(self, logits, *args):
        self.logits.append(logits.detach().clone())
        return self.sampler(logits, *args)
