"""MTP drafts for Qwen3-Next / Qwen3.5 from the checkpoint's own ``mtp.*`` head.

The head (vLLM's ``qwen3_next_mtp.py``): ``fc([pre_fc_norm_embedding(embed(x_{p+1})); pre_fc_norm_hidden(h_p)])``,
one full-attention decoder layer (with its own paged KV cache, on the target's block tables), ``norm``, then
the target's ``lm_head``: at position ``p`` it predicts token ``p + 2`` from the target's hidden state at ``p``
and token ``p + 1``. After every step it runs over the positions the step computed (prompt chunks too, so
its KV cache covers the sequence); a sequence that decodes next then gets its first draft from the last
position and further drafts by feeding the head its own output (greedy drafts).
"""

from __future__ import annotations

import copy
from typing import NamedTuple

import torch
from torch import nn

from deltaserve.engine.sequence import SequenceStatus
from deltaserve.forward_context import forward_context, make_forward_context
from deltaserve.layers.norm import ZeroCenteredRMSNorm


class StepOutputs(NamedTuple):
    """What the runner keeps of a step for the MTP head: the batch, the target's hidden states ``[T, hidden]``
    and each sequence's ``num_computed_tokens`` before the step."""

    batch: object
    hidden_states: torch.Tensor
    num_computed_before: list[int]


class MultiTokenPredictor(nn.Module):
    """The ``mtp.*`` modules, named as the checkpoint's; ``forward(embeds, hidden, positions) -> hidden``."""

    def __init__(self, model: nn.Module, dtype: torch.dtype):
        super().__init__()
        from deltaserve.models.qwen3_next import QwenDecoderLayer

        c = model.config
        size, eps = c.hidden_size, c.rms_norm_eps
        self.fc = nn.Linear(2 * size, size, bias=False, dtype=dtype)
        self.pre_fc_norm_embedding = ZeroCenteredRMSNorm(size, eps=eps, dtype=dtype)
        self.pre_fc_norm_hidden = ZeroCenteredRMSNorm(size, eps=eps, dtype=dtype)
        # NOTE: the head's layer is a full-attention layer after the model's last one (index num_hidden_layers).
        layer_config = copy.copy(c)
        layer_config.layer_types = list(c.layer_types) + ["full_attention"]
        index = c.num_hidden_layers
        mlp = type(model).make_mlp(layer_config, index, dtype)
        self.layers = nn.ModuleList([QwenDecoderLayer(layer_config, index, dtype, model.projection, mlp)])
        self.norm = ZeroCenteredRMSNorm(size, eps=eps, dtype=dtype)

    def forward(self, embeds: torch.Tensor, hidden_states: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = torch.cat([self.pre_fc_norm_embedding(embeds), self.pre_fc_norm_hidden(hidden_states)], dim=-1)
        x, residual = self.layers[0](positions, self.fc(x), None)
        x, _ = self.norm(x, residual)
        return x


class MTPProposer:
    """``observe(step)`` after every step; ``propose(seqs, num_tokens)`` for the sequences that decode next."""

    def __init__(self, config, runner):
        from deltaserve.models.loader import checkpoint_files, load_weights

        model = runner.model
        # NOTE: the configs do not say (vLLM assumes one MTP layer); the checkpoint's tensors do.
        if not hasattr(model, "projection") or not any(n.startswith("mtp.") for n in checkpoint_files(runner.config.model)):
            raise ValueError(
                "speculative_config: method 'mtp' needs a Qwen3-Next / Qwen3.5 checkpoint with an mtp.* head; "
                f"{type(model).__name__} at {runner.config.model} has none: use method 'ngram'"
            )
        self.runner = runner
        self.model = model
        with torch.device("meta"):
            head = MultiTokenPredictor(model, model.dtype)
        holder = nn.Module()
        holder.mtp = head.to_empty(device=runner.device)
        load_weights(holder, runner.config.model, only_prefix="mtp.")
        self.head = holder.mtp.eval().requires_grad_(False)
        spec = model.kv_cache_spec(runner.config.cache_dtype)
        self.kv_cache = torch.zeros((1, runner.config.num_kv_blocks, runner.config.block_size, spec.entry_dim),
                                    dtype=spec.dtype, device=runner.device)  # fmt: skip
        self.head.layers[0].mixer.kv_cache = self.kv_cache[0]
        self._last: dict[int, tuple[torch.Tensor, int]] = {}  # seq_id -> (head output at the last position, draft)
        self._block_manager = None

    def _run(self, seqs, token_ids: list[int], hidden: torch.Tensor, query_lens: list[int], starts: list[int]):
        device = self.runner.device
        ctx = make_forward_context(query_lens, starts, [0] * len(seqs), block_tables=[s.block_table for s in seqs],
                                   block_size=self.runner.config.block_size, device=device)  # fmt: skip
        positions = torch.tensor([p for s, n in zip(starts, query_lens) for p in range(s, s + n)], device=device)
        ids = torch.tensor(token_ids, device=device)
        with forward_context(ctx):
            return self.head(self.model.text_model.embed_tokens(ids), hidden, positions)

    @torch.inference_mode()
    def observe(self, step: StepOutputs, block_manager=None) -> None:
        """Run the head over the positions each running sequence of ``step`` kept (its KV cache fills).

        ``block_manager`` lets :meth:`propose` take the blocks of the draft positions early (the next
        step needs them anyway); without one, drafts stop at the blocks a sequence holds.
        """
        self._block_manager = block_manager
        self._last = {}
        seqs, lengths, starts, hidden_rows, token_ids = [], [], [], [], []
        offset = 0
        for seq, num_new, before in zip(step.batch.seqs, step.batch.num_new_tokens, step.num_computed_before):
            kept = seq.num_computed_tokens - before if seq.status == SequenceStatus.RUNNING else 0
            if kept > 0:
                seqs.append(seq)
                lengths.append(kept)
                starts.append(before)
                hidden_rows.extend(range(offset, offset + kept))
                token_ids.extend(seq.token_ids[before + 1 : before + 1 + kept])
            offset += num_new
        if not seqs:
            return
        rows = torch.tensor(hidden_rows, device=step.hidden_states.device)
        out = self._run(seqs, token_ids, step.hidden_states[rows], lengths, starts)
        ends = torch.tensor(lengths, device=out.device).cumsum(0) - 1
        last = out[ends]
        drafts = self.model.compute_logits(last).argmax(dim=-1).tolist()
        for i, seq in enumerate(seqs):
            self._last[seq.seq_id] = (last[i], drafts[i])

    @torch.inference_mode()
    def propose(self, seqs, num_tokens) -> list[list[int]]:
        """Greedy drafts: the head's prediction at the last kept position, then its own outputs fed back."""
        block_size = self.runner.config.block_size
        out: list[list[int]] = [[] for _ in seqs]
        active = []
        for i, (seq, k) in enumerate(zip(seqs, num_tokens)):
            if k > 0 and seq.seq_id in self._last:
                out[i].append(self._last[seq.seq_id][1])
                active.append(i)
        hidden = {i: self._last[seqs[i].seq_id][0] for i in active}
        bm = self._block_manager
        for i in active:
            # Draft j + 1 writes the head's KV at position num_computed + j - 1 (j < k).
            need = seqs[i].num_computed_tokens + num_tokens[i] - 1
            if bm is not None and bm.can_allocate(bm.num_new_blocks(seqs[i], need)):
                bm.allocate(seqs[i], need)
        for j in range(1, max(num_tokens, default=0)):
            active = [i for i in active if num_tokens[i] > j
                      and seqs[i].num_computed_tokens + j - 1 < len(seqs[i].block_table) * block_size]  # fmt: skip
            if not active:
                break
            starts = [seqs[i].num_computed_tokens + j - 1 for i in active]
            h = self._run([seqs[i] for i in active], [out[i][-1] for i in active],
                          torch.stack([hidden[i] for i in active]), [1] * len(active), starts)  # fmt: skip
            drafts = self.model.compute_logits(h).argmax(dim=-1).tolist()
            for row, i in enumerate(active):
                out[i].append(drafts[row])
                hidden[i] = h[row]
        return out
