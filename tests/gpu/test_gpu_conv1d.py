"""Triton causal conv1d (varlen prefill and decode update) vs the torch reference, on slot pools."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

from conftest import rel_err  # noqa: E402

from deltaserve.ops import gpu_impl  # noqa: E402
from deltaserve.ops.conv1d import (  # noqa: E402
    causal_conv1d_fn,
    causal_conv1d_fn_ref,
    causal_conv1d_update,
    causal_conv1d_update_ref,
)

DIM, KERNEL, NUM_SLOTS = 200, 4, 8


def make_pool(orientation: str, state_len: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """A NaN-filled pool ``[slots+1, L, D]`` (SD) or ``[slots+1, D, L]`` (DS) and its SD view."""
    shape = (NUM_SLOTS + 1, state_len, DIM) if orientation == "SD" else (NUM_SLOTS + 1, DIM, state_len)
    pool = torch.full(shape, float("nan"), dtype=dtype)
    view = pool if orientation == "SD" else pool.transpose(-1, -2)
    return pool, view


def to_cuda_pool(pool: torch.Tensor, orientation: str) -> tuple[torch.Tensor, torch.Tensor]:
    gpu = pool.cuda()
    return gpu, gpu if orientation == "SD" else gpu.transpose(-1, -2)


def test_gpu_dispatch_is_used():
    assert gpu_impl("conv1d", "causal_conv1d_fn") is not None
    assert gpu_impl("conv1d", "causal_conv1d_update") is not None


@pytest.mark.parametrize("orientation", ["SD", "DS"])
@pytest.mark.parametrize("state_len", [3, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_varlen_prefill_matches_reference(orientation, state_len, dtype):
    lengths = [1, 37, 2, 100, 0, 64]
    slots = [3, 1, 5, 2, 6, 8]
    has_init = [True, False, True, True, False, True]
    pool, view = make_pool(orientation, state_len, dtype)
    for slot, init in zip(slots, has_init):
        if init:  # slots without an initial state stay NaN: they must not be read
            view[slot] = torch.randn(state_len, DIM).to(dtype)
    x = torch.randn(sum(lengths), DIM).to(dtype)
    weight = torch.randn(DIM, KERNEL).to(dtype)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    index = torch.tensor(slots, dtype=torch.int32)
    init = torch.tensor(has_init)
    gpu_pool, gpu_view = to_cuda_pool(pool, orientation)
    out = causal_conv1d_fn(x.cuda(), weight.cuda(), gpu_view, cu.cuda(), index.cuda(), init.cuda())
    expected = causal_conv1d_fn_ref(x, weight, view, cu, index, init)
    assert not out.isnan().any()
    assert rel_err(out.cpu(), expected) < (1e-5 if dtype == torch.float32 else 1e-2)
    # states are copies of inputs: exact, NaN (untouched / never-written slots) in the same places
    assert torch.equal(gpu_pool.cpu().nan_to_num(1e30), pool.nan_to_num(1e30))


@pytest.mark.parametrize("orientation", ["SD", "DS"])
@pytest.mark.parametrize("state_len", [3, 6])
def test_decode_update_matches_reference(orientation, state_len):
    dtype = torch.bfloat16
    pool, view = make_pool(orientation, state_len, dtype)
    slots = [4, 2, 7]
    for slot in slots:
        view[slot] = torch.randn(state_len, DIM).to(dtype)
    # x as a strided column slice of a wider projection, as the model hands it over
    x = torch.randn(len(slots), 3 * DIM).to(dtype)[:, DIM : 2 * DIM]
    weight = torch.randn(DIM, KERNEL).to(dtype)
    index = torch.tensor(slots, dtype=torch.int32)
    gpu_pool, gpu_view = to_cuda_pool(pool, orientation)
    out = causal_conv1d_update(x.cuda(), weight.cuda(), gpu_view, index.cuda())
    expected = causal_conv1d_update_ref(x, weight, view, index)
    assert rel_err(out.cpu(), expected) < 1e-2
    assert torch.equal(gpu_pool.cpu().nan_to_num(1e30), pool.nan_to_num(1e30))


def test_prefill_then_decode_equals_one_prefill():
    dtype = torch.float32
    pool, view = make_pool("SD", 3, dtype)
    x = torch.randn(20, DIM).cuda()
    weight = torch.randn(DIM, KERNEL).cuda()
    slot = torch.tensor([5], dtype=torch.int32).cuda()
    one = pool.cuda()
    full = causal_conv1d_fn(x, weight, one, torch.tensor([0, 20], dtype=torch.int32).cuda(), slot,
                            torch.tensor([False]).cuda())
    split = pool.cuda()
    head = causal_conv1d_fn(x[:17], weight, split, torch.tensor([0, 17], dtype=torch.int32).cuda(), slot,
                            torch.tensor([False]).cuda())
    tail = [causal_conv1d_update(x[t : t + 1], weight, split, slot) for t in range(17, 20)]
    assert rel_err(torch.cat([head, *tail]), full) < 1e-6
    assert torch.equal(split[5], one[5])


@pytest.mark.parametrize("block_t", [8, 64])
def test_varlen_prefill_tiles_away_from_sequence_starts(block_t):
    from deltaserve.ops.gpu import conv1d as gpu_conv1d

    lengths, slots, has_init = [150, 3, 90], [2, 7, 4], [True, True, False]
    pool, view = make_pool("SD", 3, torch.float32)
    for slot in slots:
        view[slot] = torch.randn(3, DIM)
    x, weight = torch.randn(sum(lengths), DIM), torch.randn(DIM, KERNEL)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    index, init = torch.tensor(slots, dtype=torch.int32), torch.tensor(has_init)
    gpu_pool = pool.cuda()
    out = gpu_conv1d.causal_conv1d_fn(x.cuda(), weight.cuda(), gpu_pool, cu.cuda(), index.cuda(), init.cuda(),
                                      block_t=block_t, block_d=64)
    expected = causal_conv1d_fn_ref(x, weight, view, cu, index, init)
    assert rel_err(out.cpu(), expected) < 1e-5
    assert torch.equal(gpu_pool.cpu().nan_to_num(1e30), pool.nan_to_num(1e30))
