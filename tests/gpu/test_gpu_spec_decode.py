"""Speculative decoding on the GPU: the chunked verify path (fla kernels) commits the states of a run
without the rejected tokens, and the engine's greedy tokens with drafts equal those without."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

from conftest import rel_err  # noqa: E402
from helpers_engine import assert_all_free, random_prompts  # noqa: E402
from helpers_layer import run_layer  # noqa: E402
from helpers_model import make_checkpoint  # noqa: E402
from helpers_spec import OracleProposer, oracle_config, spec_llm  # noqa: E402
from test_spec_decode_verify import KINDS, make_layer, run_verify  # noqa: E402

from deltaserve import LLM, SamplingParams  # noqa: E402
from deltaserve.state.pool import StateGroup, StatePool  # noqa: E402

# NOTE: fla's fp32 chunked kernels use tf32 tiles; the decode kernel does not.
BOUND = 2e-3
TIE_MARGIN = 1e-3


@pytest.mark.parametrize("kind", KINDS)
def test_gpu_verify_commit_equals_decoding_the_accepted_tokens(kind):
    layer, make_cpu_pool, hidden, group = make_layer(kind)
    layout = make_cpu_pool().groups[group].layout
    layer = layer.cuda()

    def pool() -> StatePool:
        p = StatePool({group: StateGroup(layout, num_layers=1)}, num_slots=4, device="cuda")
        layer.bind_state(p.layer_state(group, 0), layout)
        return p

    prompts = [torch.randn(n, hidden, device="cuda") for n in (5, 70)]
    verify = [torch.randn(4, hidden, device="cuda") for _ in range(2)]
    accepted = [2, 4]
    plain = pool()
    slots = plain.allocate(2)
    run_layer(layer, prompts, [5, 70], [0, 0], slots)
    for t in range(4):
        rows = [i for i in range(2) if t < accepted[i]]
        run_layer(layer, [verify[i][t : t + 1] for i in rows], [1] * len(rows), [[5, 70][i] + t for i in rows],
                  [slots[i] for i in rows])  # fmt: skip
    spec = pool()
    assert spec.allocate(2) == slots
    run_layer(layer, prompts, [5, 70], [0, 0], slots)
    _, batch = run_verify(layer, verify, [4, 4], [5, 70], slots, num_verify=2)
    batch.commit(accepted)
    for slot in slots:
        for a, b in zip(spec.layer_state(group, 0), plain.layer_state(group, 0)):
            assert rel_err(a[slot].float(), b[slot].float()) < BOUND


@pytest.mark.parametrize("arch,method", [("kimi_linear", "oracle"), ("qwen3_next", "oracle"), ("qwen3_next", "mtp")])
def test_gpu_engine_greedy_tokens_with_drafts_equal_those_without(tmp_path, arch, method):
    checkpoint = make_checkpoint(tmp_path, arch=arch)
    prompts = random_prompts([7, 19, 33], seed=3)
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, logprobs=2)
    plain = LLM(model=str(checkpoint), dtype="float32", device="cuda", block_size=4)
    expected = plain.generate(prompts, params, use_tqdm=False)
    if method == "oracle":
        sequences = [p + o.outputs[0].token_ids for p, o in zip(prompts, expected)]
        llm = spec_llm(checkpoint, oracle_config(), proposer=OracleProposer(sequences), device="cuda")
    else:
        llm = spec_llm(checkpoint, {"method": "mtp", "num_speculative_tokens": 3, "auto_disable": False}, device="cuda")
    got = llm.generate(prompts, params, use_tqdm=False)
    for want, have in zip(expected, got):
        want, have = want.outputs[0], have.outputs[0]
        gaps = [sorted(lp.logprob for lp in e.values())[-1] - sorted(lp.logprob for lp in e.values())[0]
                for e in want.logprobs]  # fmt: skip
        n = next((i for i, g in enumerate(gaps) if g < TIE_MARGIN), len(gaps))
        assert have.token_ids[: n + 1] == want.token_ids[: n + 1]
    stats = llm.get_metrics()
    assert stats["spec_decode_num_draft_tokens"] > 0
    if method == "oracle":
        assert stats["spec_decode_num_accepted_tokens"] > 0
    assert_all_free(stats)
