"""Triton paged GQA attention vs the torch reference: mixed decode / chunked-prefill batches over a
NaN-poisoned cache, host or device lengths, padded rows, capture in a CUDA graph."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

from conftest import rel_err  # noqa: E402

from deltaserve.ops import gpu_impl  # noqa: E402
from deltaserve.ops.attention import paged_gqa_attention, paged_gqa_attention_ref  # noqa: E402


def paged_inputs(dtype, heads, kv_heads, head_dim, block_size=16, query_lens=(1, 1, 37, 1, 70, 5),
                 computed=(300, 17, 0, 1, 100, 63)):  # fmt: skip
    """Random K/V for every cached token in randomly chosen blocks; every other entry is NaN."""
    seq_lens = [c + q for c, q in zip(computed, query_lens)]
    num_blocks = sum(-(-n // block_size) for n in seq_lens) + 5
    cache = torch.full((num_blocks, block_size, 2 * kv_heads * head_dim), float("nan"), dtype=dtype)
    order = torch.randperm(num_blocks).tolist()
    width = max(-(-n // block_size) for n in seq_lens)
    tables = torch.full((len(seq_lens), width), -1, dtype=torch.int32)
    for b, n in enumerate(seq_lens):
        used = [order.pop() for _ in range(-(-n // block_size))]
        tables[b, : len(used)] = torch.tensor(used, dtype=torch.int32)
        flat = cache[used].view(-1, cache.shape[-1])
        flat[:n] = torch.randn(n, cache.shape[-1]).to(dtype)
        cache[used] = flat.view(len(used), block_size, -1)
    q = torch.randn(sum(query_lens), heads, head_dim).to(dtype)
    cu = torch.tensor([0, *torch.tensor(query_lens).cumsum(0).tolist()], dtype=torch.int32)
    return q, cache, cu, torch.tensor(seq_lens, dtype=torch.int32), tables


def test_gpu_dispatch_is_used():
    assert gpu_impl("attention_gqa", "paged_gqa_attention") is not None


@pytest.mark.parametrize("heads, kv_heads, head_dim", [(16, 2, 256), (4, 2, 16), (8, 8, 64)],
                         ids=["qwen3_next", "tiny", "mha"])  # fmt: skip
@pytest.mark.parametrize("dtype, bound", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("lengths_on_device", [False, True], ids=["host_lens", "device_lens"])
def test_gpu_paged_gqa_attention_matches_reference(heads, kv_heads, head_dim, dtype, bound, lengths_on_device):
    q, cache, cu, seq_lens, tables = paged_inputs(dtype, heads, kv_heads, head_dim)
    scale = head_dim**-0.5
    expected = paged_gqa_attention_ref(q.float(), cache.float(), num_kv_heads=kv_heads, cu_seqlens=cu,
                                       seq_lens=seq_lens, block_tables=tables, scale=scale)  # fmt: skip
    lens = (cu.cuda(), seq_lens.cuda()) if lengths_on_device else (cu.tolist(), seq_lens.tolist())
    out = paged_gqa_attention(q.cuda(), cache.cuda(), num_kv_heads=kv_heads, cu_seqlens=lens[0],
                              seq_lens=lens[1], block_tables=tables.cuda(), scale=scale)  # fmt: skip
    assert out.dtype == dtype and out.shape == expected.shape and not out.isnan().any()
    err = rel_err(out.float().cpu(), expected)
    print(f"paged GQA {heads}/{kv_heads}x{head_dim} {dtype}: rel err {err:.2e}")
    assert err < bound


def test_gpu_paged_gqa_attention_in_a_cuda_graph_with_padded_rows():
    """Decode rows captured once, replayed with new lengths; padded rows (length 0) give zeros."""
    q, cache, cu, seq_lens, tables = paged_inputs(torch.float32, 16, 2, 256, query_lens=(1, 1, 1, 1),
                                                  computed=(40, 3, 17, 0))  # fmt: skip
    q, cache, tables = q.cuda(), cache.cuda(), tables.cuda()
    cu, lens = cu.cuda(), seq_lens.cuda()
    lens[3] = 0  # a padded row: no key at all (its cache row is NaN)
    args = dict(num_kv_heads=2, cu_seqlens=cu, seq_lens=lens, block_tables=tables, scale=0.0625)
    paged_gqa_attention(q, cache, **args)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = paged_gqa_attention(q, cache, **args)
    lens[1] = 2  # a later step: one more token of sequence 1, read on the device at replay
    graph.replay()
    torch.cuda.synchronize()
    expected = paged_gqa_attention_ref(q[:3].cpu(), cache.cpu(), num_kv_heads=2, cu_seqlens=[0, 1, 2, 3],
                                       seq_lens=lens[:3].cpu(), block_tables=tables[:3].cpu(), scale=0.0625)
    assert rel_err(out[:3].cpu(), expected) < 1e-5
    assert (out[3] == 0).all()
