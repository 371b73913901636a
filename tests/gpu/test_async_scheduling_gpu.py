"""Async scheduling on the GPU: the same tokens as the synchronous step (CUDA graphs on), and a
decode step's launch never waits for the device (so its host work overlaps the step in flight)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

from helpers_engine import assert_all_free, random_prompts  # noqa: E402
from helpers_model import make_checkpoint  # noqa: E402

from deltaserve import LLM, SamplingParams  # noqa: E402

# As in test_engine_gpu.py: greedy tokens are compared up to the first near-tie (batches differ
# between the two runs, and a different padded graph size may break a near-tie either way).
TIE_MARGIN = 1e-3


@pytest.fixture(scope="module", params=("kimi_linear", "qwen3_next"))
def checkpoint(request, tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("async_gpu"), arch=request.param)


def make_llm(checkpoint, async_scheduling: bool, **kwargs) -> LLM:
    llm = LLM(model=str(checkpoint), dtype="float32", device="cuda", block_size=4, max_num_seqs=16,
              async_scheduling=async_scheduling, **kwargs)
    engine = llm.llm_engine
    assert (engine.async_scheduler is not None) == async_scheduling
    assert engine.runner.cuda_graphs is not None
    return llm


def first_tie(completion) -> int:
    for step, entry in enumerate(completion.logprobs):
        best = sorted(entry.values(), key=lambda lp: lp.rank)
        if len(best) > 1 and best[0].logprob - best[1].logprob < TIE_MARGIN:
            return step
    return len(completion.token_ids)


def test_default_is_on_for_cuda(checkpoint):
    llm = LLM(model=str(checkpoint), dtype="float32", device="cuda", max_num_seqs=4)
    assert llm.llm_engine.async_scheduler is not None


def test_async_tokens_equal_sync_tokens_with_cuda_graphs(checkpoint):
    prompts = random_prompts([1, 7, 22, 35, 16, 60, 3, 12, 9, 40], seed=3)
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, logprobs=2)
              for n in (12, 5, 20, 9, 16, 3, 25, 1, 30, 7)]
    seeded = [SamplingParams(temperature=1.0, top_p=0.9, seed=i, max_tokens=6 + i, ignore_eos=True)
              for i in range(len(prompts))]
    results = []
    for flag in (False, True):
        llm = make_llm(checkpoint, flag)
        greedy = [o.outputs[0] for o in llm.generate(prompts, params, use_tqdm=False)]
        sampled = [o.outputs[0].token_ids for o in llm.generate(prompts, seeded, use_tqdm=False)]
        assert_all_free(llm.get_metrics())
        results.append((greedy, sampled, llm.get_metrics()))
    (sync_greedy, sync_sampled, sync_stats), (async_greedy, async_sampled, async_stats) = results
    compared = 0
    for s, a in zip(sync_greedy, async_greedy):
        n = min(first_tie(s), first_tie(a))
        assert a.token_ids[:n + 1] == s.token_ids[:n + 1]
        compared += n
    assert compared > 50
    assert async_sampled == sync_sampled
    assert async_stats["generation_tokens"] == sync_stats["generation_tokens"]
    assert async_stats["decode_only_steps"] > 0


def test_decode_launch_does_not_wait_for_the_device(checkpoint):
    """With the step before it still in flight, a decode-only step is scheduled, prepared and launched
    (CUDA graph replay, sampler, the copy of its tokens to the host) without any synchronizing call."""
    llm = make_llm(checkpoint, True)
    runner = llm.llm_engine.runner
    launch = runner.launch
    checked = []

    def strict_launch(batch, *args, **kwargs):
        if not any(batch.is_prefill):
            torch.cuda.set_sync_debug_mode("error")
            try:
                out = launch(batch, *args, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode("default")
            checked.append(len(batch))
            return out
        return launch(batch, *args, **kwargs)

    runner.launch = strict_launch
    prompts = random_prompts([5, 9, 14, 3], seed=4)
    params = [SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True),
              SamplingParams(temperature=1.0, seed=1, top_k=5, max_tokens=12, ignore_eos=True, logprobs=3),
              SamplingParams(temperature=0.7, top_p=0.8, min_p=0.01, seed=2, max_tokens=10, ignore_eos=True),
              SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, min_tokens=4)]
    llm.generate(prompts, params, use_tqdm=False)
    assert len(checked) >= 5
