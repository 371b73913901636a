"""Greedy sampling in one pass on CUDA against torch's ``argmax`` and a float64 ``logsumexp``, and the
sampler's greedy batches on CUDA against the CPU sampler."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

from deltaserve import SamplingParams  # noqa: E402
from deltaserve.engine.sampler import Sampler  # noqa: E402
from deltaserve.ops import gpu_impl  # noqa: E402
from deltaserve.ops.sampling import greedy_sample  # noqa: E402


def test_greedy_sample_dispatches_to_the_kernel():
    assert gpu_impl("sampling", "greedy_sample") is not None


@pytest.mark.parametrize("rows, vocab", [(1, 163840), (7, 151936), (256, 163840), (3, 1000), (2, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_sample_matches_argmax_and_a_float64_logsumexp(rows, vocab, dtype):
    gen = torch.Generator(device="cuda").manual_seed(rows + vocab)
    logits = (torch.randn(rows, vocab, device="cuda", generator=gen) * 4).to(dtype)
    if vocab > 1000:
        logits[0, [5, vocab // 2, vocab - 1]] = 40.0  # a tie across chunks: the lowest index wins
    if rows > 2:
        logits[1, : vocab // 3] = float("-inf")  # masked (a grammar, min_tokens)
    token_ids, logprobs = greedy_sample(logits)
    assert token_ids.dtype == torch.int64 and logprobs.dtype == torch.float32
    assert torch.equal(token_ids, logits.argmax(dim=-1))
    wide = logits.double()
    expected = wide.gather(1, token_ids[:, None])[:, 0] - torch.logsumexp(wide, dim=-1)
    assert (logprobs.double() - expected).abs().max().item() < 1e-5


def test_greedy_sample_of_a_fully_masked_row_is_nan_like_log_softmax():
    logits = torch.randn(3, 5000, device="cuda")
    logits[1] = float("-inf")
    token_ids, logprobs = greedy_sample(logits)
    assert token_ids[1].item() == 0 and logprobs[1].isnan().item() and not logprobs[[0, 2]].isnan().any()


def test_greedy_sample_of_a_strided_view_and_of_no_rows():
    wide = torch.randn(4, 3000, device="cuda")
    view = wide[:, 100:2100]
    token_ids, logprobs = greedy_sample(view)
    assert torch.equal(token_ids, view.argmax(dim=-1))
    assert torch.allclose(logprobs, torch.log_softmax(view, -1).gather(1, token_ids[:, None])[:, 0], atol=1e-5)
    empty_ids, empty_lp = greedy_sample(wide[:0])
    assert empty_ids.shape == empty_lp.shape == (0,)


def test_greedy_batches_on_cuda_equal_the_cpu_sampler():
    logits = torch.randn(16, 32000, generator=torch.Generator().manual_seed(0)) * 3
    logits[3, 17] = logits[3, 900] = logits[3].max() + 1  # a tie
    params = [SamplingParams(temperature=0) for _ in range(15)]
    params.append(SamplingParams(temperature=0, logit_bias={11: 100.0}))
    outs = {device: Sampler()(logits.to(device), params, [None] * 16) for device in ("cpu", "cuda")}
    assert [o.token_id for o in outs["cuda"]] == [o.token_id for o in outs["cpu"]]
    assert outs["cuda"][3].token_id == 17 and outs["cuda"][15].token_id == 11
    for a, b in zip(outs["cuda"], outs["cpu"]):
        assert abs(a.logprob - b.logprob) < 1e-4 and a.top_logprobs is None


def test_greedy_sample_compiles_once_for_every_batch_size():
    # A batch size first seen mid-serving must not stop a step to compile (bench_e2e counts them).
    from deltaserve.ops.gpu import sampling as gpu_sampling

    kernels = (gpu_sampling._greedy_chunk_kernel, gpu_sampling._greedy_merge_kernel)
    if not all(hasattr(k, "device_caches") for k in kernels):
        pytest.skip("this Triton keeps no per-device kernel cache to count")
    logits = torch.randn(300, 163840, device="cuda")
    greedy_sample(logits[:1])
    device = torch.cuda.current_device()
    before = [len(k.device_caches[device][0]) for k in kernels]
    for rows in (2, 3, 7, 16, 33, 64, 100, 128, 177, 256, 300):
        token_ids, _ = greedy_sample(logits[:rows])
        assert torch.equal(token_ids, logits[:rows].argmax(dim=-1))
    assert [len(k.device_caches[device][0]) for k in kernels] == before
