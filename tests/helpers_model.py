"""Tiny checkpoints of every supported family for tests, transformers' reference model, and a runner for ours.

``run_model`` drives our model the way the engine does: a StatePool, a paged KV cache, block tables
assigned by hand, one ``make_forward_context`` per step.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers

from deltaserve.forward_context import forward_context, make_forward_context
from deltaserve.models.tiny import make_tiny
from deltaserve.state.pool import StatePool

BLOCK_SIZE = 4


# The tiny families: Kimi-Linear and the GDN models (see deltaserve.models.tiny / tiny_qwen).
GDN_ARCHS = ("qwen3_next", "qwen3_5", "qwen3_5_moe")


def make_checkpoint(tmp_path: Path, seed: int = 0, arch: str = "kimi_linear", **overrides) -> Path:
    """Write a tiny checkpoint of ``arch`` into ``tmp_path/ckpt``; ``overrides`` replace config.json keys."""
    return make_tiny(Path(tmp_path) / "ckpt", seed=seed, overrides=overrides, arch=arch)


def reference_model(path: Path):
    """transformers' model of the checkpoint's architecture (``KimiLinearForCausalLM``,
    ``Qwen3NextForCausalLM``, ...) in float32 (eager attention), loaded through its own conversion
    mapping; fails when it reports missing, unexpected or mismatched weights."""
    architecture = json.loads((Path(path) / "config.json").read_text())["architectures"][0]
    model, info = getattr(transformers, architecture).from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager", output_loading_info=True
    )
    problems = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    assert not problems, f"transformers did not load the checkpoint cleanly: {problems}"
    return model.eval()


@torch.no_grad()
def reference_logits(ref, token_ids: list[int]) -> torch.Tensor:
    """transformers' float32 logits ``[len, vocab]`` of one sequence, one full forward without cache."""
    return ref(torch.tensor([token_ids]), use_cache=False).logits[0].float()


class ModelRunner:
    """Our model with a state pool and a KV cache; sequences get a slot and blocks on first use."""

    def __init__(self, model, num_slots: int = 4, num_blocks: int = 32, block_size: int = BLOCK_SIZE):
        self.model = model
        self.block_size = block_size
        self.pool = StatePool(model.state_groups(), num_slots) if model.state_groups() else None
        spec = model.kv_cache_spec()
        # NOTE: NaN-filled so that reading a cache entry nobody wrote shows up in the logits.
        self.kv_cache = torch.full(
            (spec.num_layers, num_blocks, block_size, spec.entry_dim), float("nan"), dtype=spec.dtype
        )
        model.bind_caches(self.pool, self.kv_cache)
        self.free_blocks = list(range(num_blocks - 1, -1, -1))  # handed out from the end: tables are not 0..n
        self.seqs: dict[str, dict] = {}

    def _seq(self, seq_id: str) -> dict:
        if seq_id not in self.seqs:
            slot = self.pool.allocate(1)[0] if self.pool is not None else 0
            self.seqs[seq_id] = {"slot": slot, "blocks": [], "len": 0}
        return self.seqs[seq_id]

    @torch.no_grad()
    def step(self, batch: list[tuple[str, list[int]]]) -> list[torch.Tensor]:
        """One forward of a flat batch of ``(seq_id, new_token_ids)``; returns each sequence's logits ``[n, vocab]``."""
        seqs = [self._seq(seq_id) for seq_id, _ in batch]
        for seq, (_, ids) in zip(seqs, batch):
            while len(seq["blocks"]) * self.block_size < seq["len"] + len(ids):
                seq["blocks"].append(self.free_blocks.pop())
        ctx = make_forward_context(
            [len(ids) for _, ids in batch],
            [seq["len"] for seq in seqs],
            [seq["slot"] for seq in seqs],
            block_tables=[seq["blocks"] for seq in seqs],
            block_size=self.block_size,
        )
        input_ids = torch.tensor([t for _, ids in batch for t in ids])
        positions = torch.tensor([seq["len"] + i for seq, (_, ids) in zip(seqs, batch) for i in range(len(ids))])
        with forward_context(ctx):
            hidden = self.model(input_ids, positions)
        logits = self.model.compute_logits(hidden)
        for seq, (_, ids) in zip(seqs, batch):
            seq["len"] += len(ids)
        return list(logits.split([len(ids) for _, ids in batch]))
