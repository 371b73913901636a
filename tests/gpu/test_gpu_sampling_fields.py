"""The sampler's transformations (min_tokens, logit_bias, penalties, min_p) and prompt logprobs on
CUDA equal the CPU's: greedy tokens exactly, logprobs within 1e-4."""

from __future__ import annotations

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

from helpers_engine import random_prompts  # noqa: E402
from helpers_model import make_checkpoint  # noqa: E402

from deltaserve import LLM, SamplingParams  # noqa: E402
from deltaserve.engine.sampler import Sampler  # noqa: E402


class History:
    def __init__(self, prompt, output):
        self.token_ids, self.num_prompt_tokens = prompt + output, len(prompt)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


def test_sampler_transformations_on_cuda_equal_the_cpu():
    vocab = 1000
    logits = torch.randn(4, vocab, generator=torch.Generator().manual_seed(0)) * 3
    params = [SamplingParams(temperature=0, repetition_penalty=1.5, frequency_penalty=0.5, logprobs=3),
              SamplingParams(temperature=0, min_tokens=5, logit_bias={7: 50.0, 9: -100.0}, stop_token_ids=[7],
                             logprobs=2),
              SamplingParams(temperature=0, presence_penalty=-2.0, logprobs=1),
              SamplingParams(temperature=0.7, min_p=0.2, top_k=50, top_p=0.9, seed=1, logprobs=0)]
    histories = [History([1, 2, 3], [4, 5, 4]), History([6], [7]), History([8, 9], [10]), History([11], [])]
    outs = {}
    for device in ("cpu", "cuda"):
        generators = [None, None, None, torch.Generator(device=device).manual_seed(1)]
        outs[device] = Sampler(eos_token_ids={0})(logits.to(device), params, generators, histories=histories)
    for cpu, gpu in zip(outs["cpu"][:3], outs["cuda"][:3]):
        assert cpu.token_id == gpu.token_id and abs(cpu.logprob - gpu.logprob) < 1e-4
        assert set(cpu.top_logprobs) == set(gpu.top_logprobs)


def test_prompt_logprobs_on_cuda_equal_the_cpu(tmp_path):
    checkpoint = make_checkpoint(tmp_path)
    prompts = random_prompts([40, 7], seed=5)
    params = SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=2, ignore_eos=True)
    results = {}
    for device in ("cpu", "cuda"):
        llm = LLM(model=str(checkpoint), dtype="float32", device=device, max_num_batched_tokens=16)
        results[device] = llm.generate(prompts, params, use_tqdm=False)
    for cpu, gpu in zip(results["cpu"], results["cuda"]):
        # NOTE: fla's float32 chunked kernels use TF32 products on the GPU: logprobs of rank-249 tokens
        # (around -9.8) measured 1.07e-3 apart on an H200.
        for i, token in enumerate(cpu.prompt_token_ids[1:], start=1):
            c, g = cpu.prompt_logprobs[i][token], gpu.prompt_logprobs[i][token]
            assert abs(c.logprob - g.logprob) < 3e-3
