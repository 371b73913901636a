"""The engine on the GPU: greedy tokens equal the CPU engine's (fp32, the tiny Kimi-Linear and GDN
models, with and without CUDA graphs), and the GPU attention / MoE ops equal their torch references."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

from conftest import rel_err  # noqa: E402
from helpers_engine import assert_all_free, random_prompts  # noqa: E402
from helpers_model import GDN_ARCHS, make_checkpoint  # noqa: E402

from deltaserve import LLM, SamplingParams  # noqa: E402
from deltaserve.ops import gpu_impl  # noqa: E402
from deltaserve.ops.attention import paged_mla_attention, paged_mla_attention_ref, write_kv_cache  # noqa: E402
from deltaserve.ops.gpu import attention as gpu_attention, moe as gpu_moe  # noqa: E402
from deltaserve.ops.moe import fused_experts, fused_experts_ref  # noqa: E402

# Greedy tokens are compared up to the first step where the CPU engine's top-2 logprobs are closer
# than this: the GPU's fp32 KDA/GDN prefill (fla, tf32 tiles) may break such a near-tie either way.
TIE_MARGIN = 1e-3


@pytest.fixture(scope="module", params=("kimi_linear", *GDN_ARCHS))
def checkpoint(request, tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("engine_gpu"), arch=request.param)


def greedy_run(llm: LLM, prompts, lengths):
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, logprobs=2) for n in lengths]
    outputs = llm.generate(prompts, params, use_tqdm=False)
    assert_all_free(llm.get_metrics())
    return [o.outputs[0] for o in outputs]


def margins(completion) -> list[float]:
    """Per step: logprob gap between the best and second-best token."""
    gaps = []
    for entry in completion.logprobs:
        best = sorted((lp for lp in entry.values()), key=lambda lp: lp.rank)
        gaps.append(best[0].logprob - best[1].logprob if len(best) > 1 else float("inf"))
    return gaps


@pytest.mark.parametrize("enforce_eager", [False, True], ids=["cuda_graphs", "eager"])
def test_gpu_engine_greedy_fp32_equals_cpu_engine(checkpoint, enforce_eager):
    prompts = random_prompts([1, 7, 22, 35, 16, 60, 3], seed=7)
    lengths = [12, 5, 20, 9, 16, 3, 25]
    kwargs = dict(model=str(checkpoint), dtype="float32", block_size=4, max_num_seqs=8)
    cpu = greedy_run(LLM(device="cpu", **kwargs), prompts, lengths)
    gpu_llm = LLM(device="cuda", extra={"enforce_eager": enforce_eager}, **kwargs)
    assert (gpu_llm.llm_engine.runner.cuda_graphs is None) == enforce_eager
    gpu = greedy_run(gpu_llm, prompts, lengths)
    compared = 0
    for c, g in zip(cpu, gpu):
        gaps = margins(c)
        trusted = next((i for i, gap in enumerate(gaps) if gap < TIE_MARGIN), len(gaps))
        assert g.token_ids[:trusted] == c.token_ids[:trusted], (c.token_ids, g.token_ids, gaps)
        compared += trusted
    print(f"greedy tokens compared before a near-tie: {compared} of {sum(lengths)}")
    assert compared >= sum(lengths) // 2


def test_gpu_ops_are_dispatched():
    assert gpu_impl("attention", "paged_mla_attention") is not None
    assert gpu_impl("attention", "write_kv_cache") is not None
    assert gpu_impl("attention_gqa", "paged_gqa_attention") is not None
    assert gpu_impl("moe", "fused_experts") is not None
    print(f"torch._grouped_mm: {hasattr(torch, '_grouped_mm')}, "
          f"bf16 grouped path: {gpu_moe.grouped_mm_supported(torch.cuda.current_device())}")


def paged_inputs(dtype, heads=32, rank=512, rope=64, nope=128, v_dim=128, block_size=16, query_lens=None,
                 computed=None):
    """A batch (by default mixed: decodes and chunked prefills) over a NaN-poisoned cache whose used blocks are random."""
    query_lens = query_lens or [1, 1, 37, 1, 70, 5]
    computed = computed or [300, 17, 0, 1, 100, 63]
    seq_lens = [c + q for c, q in zip(computed, query_lens)]
    num_blocks = sum(-(-n // block_size) for n in seq_lens) + 5
    cache = torch.full((num_blocks, block_size, rank + rope), float("nan"), dtype=dtype)
    order = torch.randperm(num_blocks).tolist()
    width = max(-(-n // block_size) for n in seq_lens)
    tables = torch.full((len(seq_lens), width), -1, dtype=torch.int32)
    for b, n in enumerate(seq_lens):
        used = [order.pop() for _ in range(-(-n // block_size))]
        tables[b, : len(used)] = torch.tensor(used, dtype=torch.int32)
        flat = cache[used].view(-1, rank + rope)
        flat[:n] = torch.randn(n, rank + rope).to(dtype)
        cache[used] = flat.view(len(used), block_size, -1)
    q = torch.randn(sum(query_lens), heads, nope + rope).to(dtype)
    w_uk = (torch.randn(heads, nope, rank) * rank**-0.5).to(dtype)
    w_uv = (torch.randn(heads, v_dim, rank) * rank**-0.5).to(dtype)
    cu = torch.tensor([0, *torch.tensor(query_lens).cumsum(0).tolist()], dtype=torch.int32)
    return q, cache, w_uk, w_uv, cu, torch.tensor(seq_lens, dtype=torch.int32), tables


@pytest.mark.parametrize("dtype, bound", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("lengths_on_device", [False, True], ids=["host_lens", "device_lens"])
@pytest.mark.parametrize("query_lens", [None, [1, 1, 137, 1, 70, 5]], ids=["narrow_tile", "wide_tile"])
def test_gpu_paged_mla_attention_matches_reference(dtype, bound, lengths_on_device, query_lens):
    # NOTE: 215 tokens reach WIDE_TOKENS (32 heads a program) in bfloat16.
    q, cache, w_uk, w_uv, cu, seq_lens, tables = paged_inputs(dtype, query_lens=query_lens)
    expected = paged_mla_attention_ref(q.float(), cache.float(), w_uk.float(), w_uv.float(), cu_seqlens=cu,
                                       seq_lens=seq_lens, block_tables=tables, scale=0.1)
    lens = (cu.cuda(), seq_lens.cuda()) if lengths_on_device else (cu.tolist(), seq_lens.tolist())
    out = paged_mla_attention(q.cuda(), cache.cuda(), w_uk.cuda(), w_uv.cuda(), cu_seqlens=lens[0],
                              seq_lens=lens[1], block_tables=tables.cuda(), scale=0.1)
    assert out.dtype == dtype and out.shape == expected.shape and not out.isnan().any()
    err = rel_err(out.float().cpu(), expected)
    print(f"paged MLA {dtype}: rel err {err:.2e}")
    assert err < bound


@pytest.mark.parametrize("dtype, bound", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("computed", [[1500], [700, 2, 40, 0], [63] * 16 + [1000] * 16], ids=["b1", "b4", "b32"])
def test_gpu_paged_mla_decode_with_split_keys_matches_reference(dtype, bound, computed):
    # Decode only: few tokens, so each token's keys are split over several programs (some slices
    # empty: contexts shorter than the split count times the key block).
    assert gpu_attention.num_splits(len(computed), 32 // gpu_attention.mla_tile(len(computed))[0]) > 1
    q, cache, w_uk, w_uv, cu, seq_lens, tables = paged_inputs(dtype, query_lens=[1] * len(computed), computed=computed)
    expected = paged_mla_attention_ref(q.float(), cache.float(), w_uk.float(), w_uv.float(), cu_seqlens=cu,
                                       seq_lens=seq_lens, block_tables=tables, scale=0.1)
    out = paged_mla_attention(q.cuda(), cache.cuda(), w_uk.cuda(), w_uv.cuda(), cu_seqlens=cu.cuda(),
                              seq_lens=seq_lens.cuda(), block_tables=tables.cuda(), scale=0.1)
    assert out.dtype == dtype and not out.isnan().any()
    assert rel_err(out.float().cpu(), expected) < bound


def test_gpu_write_kv_cache_skips_padding_rows():
    cache = torch.full((6, 4, 40), float("nan"), device="cuda")
    latent = torch.randn(5, 40, device="cuda")
    slots = torch.tensor([7, -1, 0, 23, -1], device="cuda")
    write_kv_cache(latent, cache, slots)
    flat = cache.view(-1, 40)
    assert torch.equal(flat[[7, 0, 23]], latent[[0, 2, 3]])
    untouched = [i for i in range(24) if i not in (7, 0, 23)]
    assert flat[untouched].isnan().all()


@pytest.mark.parametrize("dtype, bound", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_gpu_fused_experts_match_reference(dtype, bound):
    tokens, hidden, inter, experts, top_k = 300, 256, 128, 16, 4
    x = torch.randn(tokens, hidden).to(dtype)
    w13 = (torch.randn(experts, 2 * inter, hidden) * hidden**-0.5).to(dtype)
    w2 = (torch.randn(experts, hidden, inter) * inter**-0.5).to(dtype)
    # NOTE: some experts get no token at all (ids drawn from the first 11 of 16).
    ids = torch.stack([torch.randperm(11)[:top_k] for _ in range(tokens)])
    weights = torch.rand(tokens, top_k)
    expected = fused_experts_ref(x.float(), w13.float(), w2.float(), weights, ids, "silu")
    out = fused_experts(x.cuda(), w13.cuda(), w2.cuda(), weights.cuda(), ids.cuda(), "silu")
    assert out.dtype == dtype and not out.isnan().any()
    err = rel_err(out.float().cpu(), expected)
    print(f"fused experts {dtype}: rel err {err:.2e}")
    assert err < bound
