"""MergedLinear: several projections of one input in one GEMM, each block loaded, saved and named as
its own checkpoint tensor; under TP (gloo, a real second process) each rank holds the right rows."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from safetensors.torch import save_file

from deltaserve.distributed.message_queue import gather_to_first
from deltaserve.distributed.parallel_state import destroy_distributed, init_distributed, tp_layout
from helpers_layer import linear_calls
from helpers_tp import MERGED_HIDDEN, merged_holder, merged_linear_worker, run_merged_linear

TP = 2


def checkpoint() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    return {
        "q_proj.weight": torch.randn(8, MERGED_HIDDEN, generator=gen),
        "in_proj_qkv.weight": torch.randn(16, MERGED_HIDDEN, generator=gen),
        "f_a_proj.weight": torch.randn(3, MERGED_HIDDEN, generator=gen),
        "f_a_proj.bias": torch.randn(3, generator=gen),
        "b_proj.weight": torch.randn(2, MERGED_HIDDEN, generator=gen),
    }


def rank_rows(tensors: dict[str, torch.Tensor], rank: int, tp: int, dim: int = 0) -> list[torch.Tensor]:
    """Rank ``rank``'s part of each block, written out by hand: a share of q, of each of q/k/v of the
    qkv block and of b; all of f_a."""
    def share(t, start, size):
        local = size // tp
        return t.narrow(dim, start + rank * local, local)

    qkv = tensors["in_proj_qkv"]
    return [
        share(tensors["q_proj"], 0, 8),
        torch.cat([share(qkv, 0, 4), share(qkv, 4, 4), share(qkv, 8, 8)], dim=dim),
        tensors["f_a_proj"],
        share(tensors["b_proj"], 0, 2),
    ]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    weights = tmp_path_factory.mktemp("merged") / "merged.safetensors"
    save_file(checkpoint(), str(weights))
    x = torch.randn(5, MERGED_HIDDEN, generator=torch.Generator().manual_seed(6))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        init_method = f"tcp://127.0.0.1:{sock.getsockname()[1]}"
    worker = mp.get_context("spawn").Process(target=merged_linear_worker, args=(1, TP, init_method, weights, x))
    worker.start()
    try:
        init_distributed(0, TP, init_method=init_method, timeout_s=60)
        results = gather_to_first(run_merged_linear(weights, x))
    finally:
        destroy_distributed()
        worker.join(30)
    assert worker.exitcode == 0
    return x, results


def test_each_rank_holds_its_slices_of_the_split_blocks_and_all_of_the_replicated(ranks):
    _, results = ranks
    w = {name.removesuffix(".weight"): t for name, t in checkpoint().items() if name.endswith(".weight")}
    for rank, (weight, bias, _) in enumerate(results):
        assert weight.shape == (4 + 8 + 3 + 1, MERGED_HIDDEN)
        assert torch.equal(weight, torch.cat(rank_rows(w, rank, TP))), rank
        # NOTE: the blocks without a bias hold zero bias rows, f_a its own.
        assert torch.equal(bias, torch.cat([torch.zeros(12), checkpoint()["f_a_proj.bias"], torch.zeros(1)])), rank


def test_each_rank_output_is_its_part_of_the_separate_projections(ranks):
    x, results = ranks
    c = checkpoint()
    full = {
        name: F.linear(x, c[f"{name}.weight"], c.get(f"{name}.bias"))
        for name in ("q_proj", "in_proj_qkv", "f_a_proj", "b_proj")
    }
    for rank, (_, _, y) in enumerate(results):
        expected = torch.cat(rank_rows(full, rank, TP, dim=-1), dim=-1)
        assert (y - expected).abs().max().item() <= 1e-6, rank


def test_state_dict_names_the_blocks_and_loads_back():
    with tp_layout(0, 1):
        holder, other = merged_holder(), merged_holder()
    state = holder.state_dict()
    assert {n: tuple(t.shape) for n, t in state.items()} == {
        "q_proj.weight": (8, MERGED_HIDDEN), "in_proj_qkv.weight": (16, MERGED_HIDDEN),
        "f_a_proj.weight": (3, MERGED_HIDDEN), "f_a_proj.bias": (3,), "b_proj.weight": (2, MERGED_HIDDEN),
    }  # fmt: skip
    other.load_state_dict(checkpoint())
    assert torch.equal(other.f_a_proj.weight, checkpoint()["f_a_proj.weight"])
    assert torch.equal(other.in_proj.weight, torch.cat([t for n, t in checkpoint().items() if n.endswith("weight")]))
    assert other.q_proj.bias is None and torch.equal(other.in_proj.bias[:12], torch.zeros(12))


def test_load_state_dict_names_a_missing_or_mis_shaped_block():
    with tp_layout(0, 1):
        holder = merged_holder()
    state = checkpoint()
    del state["b_proj.weight"]
    state["f_a_proj.weight"] = torch.zeros(3, MERGED_HIDDEN + 1)
    with pytest.raises(RuntimeError) as err:
        holder.load_state_dict(state)
    assert "size mismatch for f_a_proj.weight" in str(err.value) and "b_proj.weight" in str(err.value)


def test_a_size_tp_does_not_divide_is_an_error_naming_the_block():
    from deltaserve.layers.linear import LinearBlock, MergedLinear

    with tp_layout(0, 3), pytest.raises(ValueError, match="b_proj output size = 2 is not divisible by tp_size = 3"):
        MergedLinear(4, [LinearBlock("f_a_proj", 2, sharded=False), LinearBlock("b_proj", 2)])


def test_gated_mlp_is_one_gemm_for_gate_and_up_and_matches_plain_torch():
    from deltaserve.layers.mlp import GatedMLP

    with tp_layout(0, 1):
        mlp = GatedMLP(8, 12)
    gen = torch.Generator().manual_seed(7)
    gate, up = torch.randn(12, 8, generator=gen), torch.randn(12, 8, generator=gen)
    down = torch.randn(8, 12, generator=gen)
    mlp.load_state_dict({"gate_proj.weight": gate, "up_proj.weight": up, "down_proj.weight": down})
    x = torch.randn(3, 8, generator=gen)
    with torch.no_grad(), linear_calls() as calls:
        y = mlp(x)
    assert calls == [(8, 24), (12, 8)]
    assert (y - (F.silu(x @ gate.T) * (x @ up.T)) @ down.T).abs().max().item() <= 1e-5


@pytest.mark.parametrize("q_lora_rank, bias", [(None, False), (None, True), (12, True)])
def test_mla_query_and_latent_projections_are_one_gemm(q_lora_rank, bias):
    from deltaserve.forward_context import forward_context, make_forward_context
    from deltaserve.layers.mla import MLAAttention

    with tp_layout(0, 1):
        mla = MLAAttention(32, 2, q_lora_rank=q_lora_rank, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4,
                           v_head_dim=8, bias=bias)  # fmt: skip
    # NOTE: q_proj has no bias; q_a_proj and the latent one have one when the config asks for it.
    assert mla.kv_a_proj_with_mqa.bias is not None if bias else mla.kv_a_proj_with_mqa.bias is None
    assert (mla.q_proj.bias is None) if q_lora_rank is None else (mla.q_a_proj.bias is not None)
    mla.kv_cache = torch.zeros(2, 4, 16 + 4)
    ctx = make_forward_context([3], [0], [1], block_tables=[[0]], block_size=4)
    with torch.no_grad(), forward_context(ctx), linear_calls() as calls:
        mla(torch.arange(3), torch.randn(3, 32))
    q_width = 2 * 12 if q_lora_rank is None else q_lora_rank
    assert [c for c in calls if c[0] == 32] == [(32, q_width + 16 + 4)]
