"""The vocabulary split across TP ranks: :class:`VocabParallelEmbedding` and :class:`ParallelLMHead`.

Rank ``r`` holds rows ``[r * n, (r+1) * n)`` of the ``[vocab, hidden]`` table, ``n = ceil(vocab / tp)``;
rows past the vocabulary (the last rank's padding) are zero. The embedding looks up the ids in its
range (others give zeros) and all-reduces; the LM head computes its slice of the logits and
all-gathers them, so every rank has the full ``[N, vocab]`` logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from deltaserve.distributed.communication_op import tensor_model_parallel_all_gather, tensor_model_parallel_all_reduce
from deltaserve.distributed.parallel_state import get_tp_group
from deltaserve.distributed.sharding import WeightSlot, read_loaded


class VocabParallelEmbedding(nn.Module):
    """``forward(input_ids [T]) -> [T, hidden]``; the parameter is ``weight`` ``[ceil(vocab/tp), hidden]``."""

    def __init__(self, num_embeddings: int, embedding_dim: int, dtype: torch.dtype | None = None):
        super().__init__()
        group = get_tp_group()
        self.tp_size = group.world_size
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        per_rank = -(-num_embeddings // self.tp_size)
        self.vocab_start = min(group.rank * per_rank, num_embeddings)
        self.vocab_end = min(self.vocab_start + per_rank, num_embeddings)
        self.weight = nn.Parameter(torch.empty(per_rank, embedding_dim, dtype=dtype), requires_grad=False)

    def weight_loader(self, param: nn.Parameter, loaded_weight) -> None:
        rows = self.vocab_end - self.vocab_start
        if self.tp_size == 1:
            param.data.copy_(read_loaded(loaded_weight))
            return
        param.data[:rows].copy_(read_loaded(loaded_weight, 0, self.vocab_start, rows))
        param.data[rows:].zero_()

    def weight_loaders(self) -> dict[str, WeightSlot]:
        return {"weight": ((self.num_embeddings, self.embedding_dim), lambda w: self.weight_loader(self.weight, w))}

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        in_range = (input_ids >= self.vocab_start) & (input_ids < self.vocab_end)
        local_ids = torch.where(in_range, input_ids - self.vocab_start, 0)
        out = F.embedding(local_ids, self.weight) * in_range.unsqueeze(-1).to(self.weight.dtype)
        return tensor_model_parallel_all_reduce(out)


class ParallelLMHead(VocabParallelEmbedding):
    """The output projection: ``forward(hidden [N, hidden]) -> logits [N, vocab]`` on every rank.

    NOTE: its forward is the projection (unlike the embedding's lookup), so that a model calls it as
    it would call an ``nn.Linear`` LM head; a tied head shares the embedding's (equally split) table.
    """

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        logits = F.linear(hidden_states, self.weight)
        if self.tp_size == 1:
            return logits
        return tensor_model_parallel_all_gather(logits, dim=-1)[..., : self.num_embeddings]
