"""The NIXL connector alone, two agents in this process: one READ moves a slot and its blocks exactly,
converts SD to DS, notifies the producer; mismatches are refused before any metadata is loaded.
Runs on the CPU (UCX over host memory) and, where there is one, on a GPU (device memory)."""

from __future__ import annotations

import asyncio

import pytest
import torch

from deltaserve.disagg.connector import KVConnector, nixl_available
from deltaserve.kv.spec import KVCacheSpec
from deltaserve.state.layout import kda_layout
from deltaserve.state.pool import StateGroup, StatePool
from deltaserve.state.wire import WireMismatch, build_header

pytestmark = pytest.mark.skipif(not nixl_available(), reason="needs NIXL (pip install 'deltaserve[pd]')")
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]


def _instance(role: str, device: str, conv_layout: str = "SD", dtype=torch.float32, seed: int = 0):
    layout = kda_layout(4, 8, conv_layout=conv_layout, model_dtype=dtype)
    pool = StatePool({"kda": StateGroup(layout, 3)}, num_slots=6, device=device)
    kv = torch.zeros(2, 10, 4, 24, dtype=dtype, device=device)  # [layers, blocks, block_size, entry]
    gen = torch.Generator(device="cpu").manual_seed(seed)
    for t in (pool.conv["kda"], pool.recurrent["kda"], kv):
        t.copy_(torch.randn(t.shape, generator=gen).to(t.dtype))
    header = build_header("fp", dtype, 4, pool.groups, KVCacheSpec(2, 24, dtype), kv)
    return KVConnector(role, pool, kv, header), pool, kv


def _load(producer, consumer, peer, remote_slot, remote_blocks, slot, blocks, notif="req-1") -> list[str]:
    """The READ, with the producer polled meanwhile (as its instance's notification loop does: the
    agents run without a progress thread); returns the producer's completion notices."""
    done: list[str] = []

    async def run() -> None:
        async def drive() -> None:
            while True:
                done.extend(producer.get_finished_sending())
                await asyncio.sleep(0)

        driver = asyncio.create_task(drive())
        handle = consumer.start_load(peer, remote_slot, remote_blocks, slot, blocks, notif)
        await consumer.wait_for_load(peer, handle, slot, timeout_s=30)
        for _ in range(1000):
            if done:
                break
            await asyncio.sleep(0.001)
        driver.cancel()

    asyncio.run(run())
    return done


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("conv_layout", ["SD", "DS"])
def test_one_read_moves_the_slot_and_blocks_exactly(device, conv_layout):
    producer, p_pool, p_kv = _instance("prefill", device, seed=1)
    consumer, c_pool, c_kv = _instance("decode", device, conv_layout=conv_layout, seed=2)
    untouched = (c_pool.conv["kda"].clone(), c_pool.recurrent["kda"].clone(), c_kv.clone())
    peer = consumer.add_peer("http://producer", producer.handshake_info())
    assert peer.plan.convert_conv == (() if conv_layout == "SD" else ("kda",))
    done = _load(producer, consumer, peer, 2, [7, 3, 5], 4, [1, 8, 0])
    conv = c_pool.conv["kda"][:, 4] if conv_layout == "SD" else c_pool.conv["kda"][:, 4].transpose(-1, -2)
    assert torch.equal(conv, p_pool.conv["kda"][:, 2])
    assert torch.equal(c_pool.recurrent["kda"][:, 4], p_pool.recurrent["kda"][:, 2])
    assert torch.equal(c_kv[:, [1, 8, 0]], p_kv[:, [7, 3, 5]])
    # Nothing else of the consumer was written.
    others = [s for s in range(7) if s != 4]
    assert torch.equal(c_pool.recurrent["kda"][:, others], untouched[1][:, others])
    assert torch.equal(c_pool.conv["kda"][:, others], untouched[0][:, others])
    assert torch.equal(c_kv[:, [2, 3, 4, 5, 6, 7, 9]], untouched[2][:, [2, 3, 4, 5, 6, 7, 9]])
    assert done == ["req-1"]


def test_other_dtype_is_refused_before_metadata_is_loaded():
    producer, _, _ = _instance("prefill", "cpu", dtype=torch.bfloat16)
    consumer, _, _ = _instance("decode", "cpu")
    with pytest.raises(WireMismatch, match="model_dtype"):
        consumer.add_peer("http://producer", producer.handshake_info())


def test_block_count_mismatch_is_a_transfer_error():
    from deltaserve.disagg.connector import TransferError

    producer, _, _ = _instance("prefill", "cpu")
    consumer, _, _ = _instance("decode", "cpu")
    peer = consumer.add_peer("http://producer", producer.handshake_info())
    with pytest.raises(TransferError, match="KV blocks"):
        consumer.start_load(peer, 1, [1, 2], 1, [3], "x")
