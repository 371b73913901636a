"""GatedDeltaNet split over 2 TP ranks (gloo, a real second process): key-head groups with their value
heads per rank. The ranks' outputs equal the unsharded layer's (the row-parallel ``out_proj`` sums them)
and their states are exactly the unsharded states' head slices, for both projection layouts."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import save_file

from deltaserve.distributed.message_queue import gather_to_first
from deltaserve.distributed.parallel_state import destroy_distributed, init_distributed, tp_layout
from deltaserve.layers.gdn import GatedDeltaNet
from helpers_tp import GDN_SIZES, gdn_config, gdn_worker, run_gdn_layer

BOUND = 1e-5
TP = 2


def random_weights(projection: str, path) -> str:
    torch.manual_seed(3)
    with tp_layout(0, 1):
        layer = GatedDeltaNet.from_config(gdn_config(projection), layer_idx=0, projection=projection)
    weights = {name: torch.randn(t.shape) * (0.5 if "conv" in name else 0.2) for name, t in layer.state_dict().items()}
    weights["A_log"] = torch.empty(GDN_SIZES["hv"]).uniform_(0.01, 16).log()
    file = str(path / f"gdn-{projection}.safetensors")
    save_file(weights, file)
    return file


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    path = tmp_path_factory.mktemp("gdn-tp")
    weights = {p: random_weights(p, path) for p in ("qkvz", "split")}
    hidden = torch.randn(10, GDN_SIZES["hidden"], generator=torch.Generator().manual_seed(4))
    with tp_layout(0, 1):
        full = {p: run_gdn_layer(p, w, hidden, 1) for p, w in weights.items()}
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        init_method = f"tcp://127.0.0.1:{sock.getsockname()[1]}"
    worker = mp.get_context("spawn").Process(target=gdn_worker, args=(1, TP, init_method, weights, hidden))
    worker.start()
    try:
        init_distributed(0, TP, init_method=init_method, timeout_s=60)
        ranks = {p: gather_to_first(run_gdn_layer(p, w, hidden, TP)) for p, w in weights.items()}
    finally:
        destroy_distributed()
        worker.join(30)
    assert worker.exitcode == 0
    return full, ranks


@pytest.mark.parametrize("projection", ["qkvz", "split"])
def test_sharded_gdn_outputs_equal_the_unsharded_layer(results, projection):
    full, ranks = results
    expected = full[projection][0]
    for rank, (out, _, _) in enumerate(ranks[projection]):
        assert not out.isnan().any()
        assert (out - expected).abs().max().item() <= BOUND * expected.abs().max().item(), rank


@pytest.mark.parametrize("projection", ["qkvz", "split"])
def test_each_rank_holds_its_heads_of_the_states(results, projection):
    full, ranks = results
    s = GDN_SIZES
    _, conv, recurrent = full[projection]
    key, value = s["hk"] * s["dk"], s["hv"] * s["dv"]
    for rank, (_, rank_conv, rank_recurrent) in enumerate(ranks[projection]):
        heads = s["hv"] // TP
        # [q_local | k_local | v_local] and the rank's value heads (Dv, Dk) states.
        assert rank_conv.shape[-1] == (2 * key + value) // TP
        assert rank_recurrent.shape[1:] == (heads, s["dv"], s["dk"])
        assert torch.allclose(rank_recurrent, recurrent[:, rank * heads : (rank + 1) * heads], atol=BOUND)
        q, k, v = (key // TP, key // TP, value // TP)
        expected = torch.cat(
            [conv[..., rank * q : (rank + 1) * q], conv[..., key + rank * k : key + (rank + 1) * k],
             conv[..., 2 * key + rank * v : 2 * key + (rank + 1) * v]], dim=-1,
        )  # fmt: skip
        assert torch.allclose(rank_conv, expected, atol=BOUND)


def test_key_heads_that_tp_does_not_divide_are_an_error_naming_them():
    with tp_layout(0, 4), pytest.raises(ValueError, match="GDN linear_num_key_heads = 2 is not divisible by tp_size = 4"):
        GatedDeltaNet.from_config(gdn_config("qkvz"), layer_idx=0)
