"""In-forward prefix-cache checkpoints on the GPU: fla's chunked pipeline with float32 chunk states
(``ops/gpu/chunk_states.py``) must save the states of an uncut prefill (op level, KDA and GDN, against the torch
reference and against a GPU prefill cut there), and hits must give the tokens of misses (engine)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

from conftest import rel_err  # noqa: E402
from helpers_engine import assert_all_free_after_reset, random_prompts  # noqa: E402
from helpers_model import GDN_ARCHS, make_checkpoint  # noqa: E402

from deltaserve import LLM, SamplingParams  # noqa: E402
from deltaserve.forward_context import StateCheckpoints  # noqa: E402
from deltaserve.ops.conv1d import causal_conv1d_fn  # noqa: E402
from deltaserve.ops.delta_rule import chunk_delta_rule, chunk_delta_rule_ref  # noqa: E402

HK, HV, DK, DV, NUM_SLOTS = 2, 4, 64, 64, 12
LENGTHS = [200, 70, 300]
CUTS = [[(64, 5), (192, 6)], [], [(128, 7), (256, 8)]]


def inputs(gate: str, dtype: torch.dtype):
    torch.manual_seed(0)
    n = sum(LENGTHS)
    q, k = torch.randn(n, HK, DK), torch.randn(n, HK, DK)
    v, beta = torch.randn(n, HV, DV), torch.rand(n, HV)
    g = -0.05 * torch.rand(n, HV, DK) if gate == "kda" else -0.05 * torch.rand(n, HV)
    if gate == "kda":  # fla's KDA kernels take one q/k head per value head
        q, k = q.repeat_interleave(HV // HK, 1), k.repeat_interleave(HV // HK, 1)
    return [t.cuda().to(dtype) for t in (q, k, v)] + [g.cuda(), beta.cuda().to(dtype)]


def cu_of(lengths: list[int]) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda")


@pytest.mark.parametrize("gate", ["kda", "gdn"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_gpu_checkpoints_equal_a_gpu_prefill_cut_there_and_the_reference(gate, dtype):
    q, k, v, g, beta = inputs(gate, dtype)
    pool = torch.full((NUM_SLOTS + 1, HV, DV, DK), float("nan"), device="cuda")
    pool[1:4] = 0.1 * torch.randn(3, HV, DV, DK, device="cuda")
    start = pool.clone()
    cu, slots = cu_of(LENGTHS), torch.tensor([1, 2, 3], dtype=torch.int32, device="cuda")
    initial = torch.tensor([True, False, True], device="cuda")
    checkpoints = StateCheckpoints.from_batch(CUTS, LENGTHS, [1, 2, 3])
    out = chunk_delta_rule(q, k, v, g, beta, pool, cu, slots, initial, checkpoints=checkpoints)
    plain = start.clone()
    out_plain = chunk_delta_rule(q, k, v, g, beta, plain, cu, slots, initial)
    # One pass with float32 chunk states: the outputs and final states of fla's own uncut call.
    assert rel_err(out.float(), out_plain.float()) < 1e-6 and rel_err(pool[1:4], plain[1:4]) < 1e-6
    ref_pool = start.cpu()
    chunk_delta_rule_ref(*(t.cpu() for t in (q, k, v, g, beta)), ref_pool, cu.cpu(), slots.cpu(), initial.cpu(),
                         checkpoints=checkpoints)  # fmt: skip
    # NOTE: fla's chunked kernels round through TF32 even for float32 inputs (measured on an H200: KDA
    # 1.1e-3, GDN 8.1e-4); the checkpoint's equality with a GPU prefill cut there (above) is the
    # exactness check.
    bound = 5e-3 if dtype == torch.float32 else 2e-2
    bounds = cu.tolist()
    for b, cuts in enumerate(CUTS):
        for offset, target in cuts:
            rows = slice(bounds[b], bounds[b] + offset)
            cut = start.clone()
            chunk_delta_rule(q[rows], k[rows], v[rows], g[rows], beta[rows], cut, cu_of([offset]),
                             slots[b : b + 1], initial[b : b + 1])  # fmt: skip
            assert rel_err(pool[target], cut[b + 1]) < 1e-6
            assert rel_err(pool[target].cpu(), ref_pool[target]) < bound


def test_gpu_conv_windows_at_checkpoints():
    x = torch.randn(sum(LENGTHS), 48, device="cuda", dtype=torch.bfloat16)
    weight = torch.randn(48, 4, device="cuda", dtype=torch.bfloat16)
    conv = torch.zeros(NUM_SLOTS + 1, 48, 3, device="cuda", dtype=torch.bfloat16).transpose(-1, -2)  # DS pool
    cu, slots = cu_of(LENGTHS), torch.tensor([1, 2, 3], dtype=torch.int32, device="cuda")
    causal_conv1d_fn(x, weight, conv, cu, slots, torch.zeros(3, dtype=torch.bool, device="cuda"), "silu",
                     StateCheckpoints.from_batch(CUTS, LENGTHS, [1, 2, 3]))  # fmt: skip
    bounds = cu.tolist()
    for b, cuts in enumerate(CUTS):
        for offset, target in cuts:
            assert torch.equal(conv[target], x[bounds[b] + offset - 3 : bounds[b] + offset])


@pytest.mark.parametrize("arch", ["kimi_linear", *GDN_ARCHS])
def test_gpu_hits_on_interior_checkpoints_give_the_tokens_of_misses_fp32(arch, tmp_path):
    checkpoint = make_checkpoint(tmp_path, arch=arch)
    kwargs = dict(model=str(checkpoint), dtype="float32", device="cuda", max_num_batched_tokens=128, block_size=16)
    cached, plain = LLM(checkpoint_interval=64, **kwargs), LLM(enable_prefix_caching=False, **kwargs)
    (system,) = random_prompts([200], seed=60)
    prompts = [system + s for s in random_prompts([5, 9, 14, 30, 2, 21], seed=61)]
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=2)
    first = cached.generate(prompts[:1], params, use_tqdm=False)
    rest = cached.generate(prompts[1:], params, use_tqdm=False)
    assert [o.num_cached_tokens for o in rest] == [192] * 5  # the deepest checkpoint inside the system prompt
    expected = plain.generate(prompts, params, use_tqdm=False)
    compared = 0
    for hit, miss in zip(first + rest, expected):
        # NOTE: up to a near-tie of the miss's top two tokens: GEMMs of other batch sizes may break it either way.
        gaps = [sorted(e.values(), key=lambda lp: lp.rank) for e in miss.outputs[0].logprobs]
        trusted = next((i for i, lp in enumerate(gaps) if lp[0].logprob - lp[1].logprob < 1e-3), len(gaps))
        assert hit.outputs[0].token_ids[:trusted] == miss.outputs[0].token_ids[:trusted]
        compared += trusted
    print(f"{arch}: greedy tokens compared before a near-tie: {compared} of {8 * len(prompts)}")
    assert compared >= 4 * len(prompts)
    assert cached.get_metrics()["checkpoints_captured"] >= 2
    assert_all_free_after_reset(cached)


@pytest.mark.parametrize("arch", ["kimi_linear", "qwen3_next"])
def test_gpu_bf16_hits_vs_misses_over_many_prompts(arch, tmp_path):
    """bf16 weights, float32 recurrent states: 48 prompts over 3 system prompts, hits vs misses.

    In bf16 greedy tokens may part wherever other GEMM shapes round differently (a hit computes only
    the suffix; MoE routing near a tie flips on such noise). The yardstick is the same engine without
    the cache run on the same prompts one at a time instead of batched: a hit must not part from the
    batched miss much more often than that. Prints both counts and the margins where they part.
    """
    checkpoint = make_checkpoint(tmp_path, arch=arch)
    kwargs = dict(model=str(checkpoint), dtype="bfloat16", device="cuda", max_num_batched_tokens=512, block_size=16)
    cached, plain = LLM(checkpoint_interval=64, **kwargs), LLM(enable_prefix_caching=False, **kwargs)
    assert all(t.dtype == torch.float32 for t in cached.llm_engine.runner.state_pool.recurrent.values())
    systems = random_prompts([150, 260, 400], seed=62)
    prompts = [systems[i % 3] + s for i, s in enumerate(random_prompts([3 + (7 * i) % 40 for i in range(48)], seed=63))]
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, logprobs=2)
    hits = cached.generate(prompts[:3], params, use_tqdm=False) + cached.generate(prompts[3:], params, use_tqdm=False)
    misses = plain.generate(prompts, params, use_tqdm=False)
    alone = [plain.generate([p], params, use_tqdm=False)[0] for p in prompts]
    assert sum(o.num_cached_tokens > 0 for o in hits) >= 45

    def partings(outputs) -> list[tuple[int, float]]:
        found = []
        for out, miss in zip(outputs, misses):
            a, b = out.outputs[0].token_ids, miss.outputs[0].token_ids
            if a != b:
                i = next(j for j, (x, y) in enumerate(zip(a, b)) if x != y)
                best = sorted(miss.outputs[0].logprobs[i].values(), key=lambda lp: lp.rank)
                found.append((i, round(best[0].logprob - best[1].logprob, 4)))
        return found

    divergent, noise = partings(hits), partings(alone)
    print(f"{arch} bf16: hits part from batched misses in {len(divergent)} of {len(prompts)} requests {divergent}; "
          f"misses run alone part from them in {len(noise)} {noise}")
    assert len(divergent) <= 2 * len(noise) + len(prompts) // 8


@pytest.mark.parametrize("gate", ["kda", "gdn"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_float32_chunk_states_pipeline_equals_fla_call(gate, dtype):
    """The project's step-by-step run of fla's pipeline: fla's outputs and final states, and its
    per-chunk states (which fla stores in the inputs' dtype) in float32."""
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule
    from fla.ops.kda import chunk_kda

    from deltaserve.ops.gpu.chunk_states import chunk_index, chunk_with_states

    q, k, v, g, beta = inputs(gate, dtype)
    cu = cu_of(LENGTHS).long()
    initial = 0.1 * torch.randn(len(LENGTHS), HV, DV, DK, device="cuda")
    args = [t.unsqueeze(0) for t in (q, k, v, g, beta)]
    out, final, h = chunk_with_states(*args, head_gate=gate == "gdn", scale=DK**-0.5, initial_state=initial.clone(),
                                      cu_seqlens=cu, use_qk_l2norm_in_kernel=True)  # fmt: skip
    fla_fn = chunk_gated_delta_rule if gate == "gdn" else chunk_kda
    with torch.inference_mode():
        if gate == "kda":
            ref_out, ref_final, ref_h = fla_fn(*args, initial_state=initial.clone(), output_final_state=True,
                                               use_qk_l2norm_in_kernel=True, state_v_first=True, cu_seqlens=cu,
                                               return_intermediate_states=True)  # fmt: skip
        else:
            ref_out, ref_final = fla_fn(*args, initial_state=initial.clone(), output_final_state=True,
                                        use_qk_l2norm_in_kernel=True, state_v_first=True, cu_seqlens=cu)  # fmt: skip
            ref_h = None
    assert h.dtype == torch.float32 and h.shape[1] == sum(-(-n // 64) for n in LENGTHS)
    assert rel_err(out.float(), ref_out.float()) < 1e-6 and rel_err(final, ref_final) < 1e-6
    if ref_h is not None:  # fla's own per-chunk states, rounded to the inputs' dtype
        assert rel_err(h.to(dtype).float(), ref_h.float()) < 1e-6
    # The state before chunk c of sequence 2 is the final state of a prefill of its first c chunks.
    lo = sum(LENGTHS[:2])
    for offset in (64, 192):
        rows = slice(lo, lo + offset)
        part = [t[rows].unsqueeze(0) for t in (q, k, v, g, beta)]
        _, cut_final, _ = chunk_with_states(*part, head_gate=gate == "gdn", scale=DK**-0.5,
                                            initial_state=initial[2:].clone(), cu_seqlens=cu_of([offset]).long(),
                                            use_qk_l2norm_in_kernel=True)  # fmt: skip
        assert rel_err(h[0, chunk_index(LENGTHS, 2, offset)], cut_final[0]) < 1e-6
