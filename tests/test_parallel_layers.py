"""Tensor-parallel layers built as each rank (no processes): shapes, and which slice each rank reads."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from deltaserve.distributed.parallel_state import tp_layout
from deltaserve.layers.linear import ColumnParallelLinear, MergedColumnParallelLinear, RowParallelLinear
from deltaserve.layers.vocab_parallel_embedding import VocabParallelEmbedding
from deltaserve.models.loader import load_model
from helpers_tp import make_tp_checkpoint

TP = 4


class SpySlice:
    """A safetensors-slice stand-in that records what is read."""

    def __init__(self, tensor: torch.Tensor):
        self.tensor, self.reads = tensor, []

    def get_shape(self) -> list[int]:
        return list(self.tensor.shape)

    def __getitem__(self, index):
        self.reads.append(index)
        return self.tensor[index]


def full(*shape: int) -> torch.Tensor:
    return torch.arange(float(torch.Size(shape).numel())).reshape(shape)


@pytest.mark.parametrize("rank", range(TP))
def test_column_and_row_parallel_read_only_their_slice(rank):
    with tp_layout(rank, TP):
        column, row = ColumnParallelLinear(8, 16), RowParallelLinear(16, 8)
    w = full(16, 8)
    spy = SpySlice(w)
    column.weight_loader(column.weight, spy)
    assert spy.reads == [(slice(4 * rank, 4 * rank + 4), slice(None))]
    assert torch.equal(column.weight, w[4 * rank : 4 * rank + 4])
    spy = SpySlice(w.T.contiguous())
    row.weight_loader(row.weight, spy)
    assert spy.reads == [(slice(None), slice(4 * rank, 4 * rank + 4))]
    assert torch.equal(row.weight, w.T[:, 4 * rank : 4 * rank + 4])


def test_merged_column_takes_its_slice_of_every_block():
    with tp_layout(1, 2):
        merged = MergedColumnParallelLinear(3, [4, 4, 8])  # e.g. [q | k | v]
    w = full(16, 3)
    merged.weight_loader(merged.weight, SpySlice(w))
    assert torch.equal(merged.weight, torch.cat([w[2:4], w[6:8], w[12:16]]))


def test_vocab_shards_pad_the_last_rank_with_zeros():
    w = full(10, 2)
    with tp_layout(3, TP):
        embed = VocabParallelEmbedding(10, 2)  # 3 rows a rank: rank 3 holds row 9 and two zero rows
    embed.weight_loader(embed.weight, SpySlice(w))
    assert (embed.vocab_start, embed.vocab_end) == (9, 10)
    assert torch.equal(embed.weight, torch.cat([w[9:], torch.zeros(2, 2)]))


def test_a_size_tp_does_not_divide_is_an_error_naming_it():
    with tp_layout(0, 3), pytest.raises(ValueError, match="MLP intermediate_size = 128 is not divisible by tp_size = 3"):
        ColumnParallelLinear(8, 128, what="MLP intermediate_size")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    path = make_tp_checkpoint(tmp_path_factory.mktemp("shards"))
    ranks = []
    for rank in range(TP):
        with tp_layout(rank, TP):
            ranks.append(dict(load_model(path).state_dict()))
    with safe_open(path / "model.safetensors", framework="pt") as f:
        checkpoint = {name: f.get_tensor(name) for name in f.keys()}
    return checkpoint, ranks


def test_the_ranks_shards_put_together_are_the_checkpoint(shards):
    checkpoint, ranks = shards
    checked = 0
    for name, tensor in checkpoint.items():
        if name not in ranks[0]:
            continue  # the stacked experts: next test
        parts = [r[name] for r in ranks]
        split = [d for d in range(tensor.dim()) if parts[0].shape[d] != tensor.shape[d]]
        if not split:  # replicated: the router, norms, the low-rank gate projections, the MLA latent
            assert all(torch.equal(p, tensor) for p in parts), name
        else:
            whole = torch.cat(parts, dim=split[0]).narrow(split[0], 0, tensor.shape[split[0]])
            assert torch.equal(whole, tensor), name
        checked += 1
    stacked = [n for n in ranks[0] if n.endswith(("w13_weight", "w2_weight"))]
    assert checked + len(stacked) == len(ranks[0]) and len(stacked) == 6  # 3 MoE layers
    # The vocabulary (330 rows, 83 a rank): only the last rank has padding, and it is zero.
    assert ranks[-1]["lm_head.weight"][330 - 3 * 83 :].abs().sum() == 0


def test_the_ranks_hold_their_slice_of_every_expert(shards):
    checkpoint, ranks = shards
    prefix = "model.layers.1.block_sparse_moe."
    inter = checkpoint[f"{prefix}experts.0.w1.weight"].shape[0] // TP
    for rank, state in enumerate(ranks):
        rows = slice(rank * inter, (rank + 1) * inter)
        for e in range(8):
            w1, w3, w2 = (checkpoint[f"{prefix}experts.{e}.{n}.weight"] for n in ("w1", "w3", "w2"))
            assert torch.equal(state[f"{prefix}experts.w13_weight"][e], torch.cat([w1[rows], w3[rows]]))
            assert torch.equal(state[f"{prefix}experts.w2_weight"][e], w2[:, rows])


@pytest.mark.parametrize("tp, rank, head", [(2, 1, 1), (4, 1, 0), (4, 2, 1), (8, 7, 1)])
def test_kv_heads_are_split_then_replicated_past_their_number(tp, rank, head):
    from deltaserve.layers.linear import KVParallelLinear

    with tp_layout(rank, tp):
        k_proj = KVParallelLinear(8, num_kv_heads=2, head_dim=3)  # 2 KV heads of 3 rows
    w = full(6, 8)
    k_proj.weight_loader(k_proj.weight, SpySlice(w))
    assert torch.equal(k_proj.weight, w[3 * head : 3 * head + 3])


def test_kv_heads_tp_neither_divides_nor_multiplies_are_an_error():
    from deltaserve.layers.linear import KVParallelLinear

    with tp_layout(0, 3), pytest.raises(ValueError, match="tp_size = 3 is neither a divisor nor a multiple of num_key_value_heads = 2"):
        KVParallelLinear(8, num_kv_heads=2, head_dim=3)
