"""MTP drafts from the checkpoint's ``mtp.*`` head (tiny GDN models, random head weights, float32).

The head's drafts after a prefill equal a head built from transformers' own Qwen3-Next modules (its
decoder layer, norms, rotary embedding) run over the whole sequence without a cache; greedy tokens
with MTP drafts equal transformers' ``generate`` with chunked prefill, preemption and prefix-cache hits.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import rel_err
from safetensors.torch import load_file
from transformers.masking_utils import create_causal_mask
from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextDecoderLayer, Qwen3NextRMSNorm

from deltaserve import SamplingParams
from deltaserve.engine.llm_engine import LLMEngine
from helpers_engine import GreedyReference, assert_all_free, random_prompts
from helpers_model import make_checkpoint, reference_model
from helpers_spec import spec_llm

MTP = {"method": "mtp", "num_speculative_tokens": 3, "auto_disable": False}


def transformers_head(ref, checkpoint):
    """The mtp.* head with transformers' modules: (fc, norm_embedding, norm_hidden, decoder layer, norm)."""
    weights = {k[len("mtp."):]: v for k, v in load_file(checkpoint / "model.safetensors").items() if k.startswith("mtp.")}
    config = copy.deepcopy(ref.config)
    config.layer_types = list(config.layer_types) + ["full_attention"]
    layer = Qwen3NextDecoderLayer(config, layer_idx=config.num_hidden_layers)
    state = {k[len("layers.0."):]: v for k, v in weights.items() if k.startswith("layers.0.") and ".experts." not in k}
    experts = config.num_experts
    # Per-expert checkpoint tensors to transformers' stacked experts (gate rows first, as it chunks them).
    state["mlp.experts.gate_up_proj"] = torch.stack([
        torch.cat([weights[f"layers.0.mlp.experts.{e}.gate_proj.weight"], weights[f"layers.0.mlp.experts.{e}.up_proj.weight"]])
        for e in range(experts)
    ])  # fmt: skip
    state["mlp.experts.down_proj"] = torch.stack([weights[f"layers.0.mlp.experts.{e}.down_proj.weight"] for e in range(experts)])
    layer.load_state_dict(state, strict=True)
    norms = []
    for name in ("pre_fc_norm_embedding", "pre_fc_norm_hidden", "norm"):
        norm = Qwen3NextRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        norm.load_state_dict({"weight": weights[f"{name}.weight"]})
        norms.append(norm)
    fc = torch.nn.Linear(2 * config.hidden_size, config.hidden_size, bias=False)
    fc.load_state_dict({"weight": weights["fc.weight"]})
    return fc, norms, layer.eval()


@torch.no_grad()
def reference_drafts(ref, checkpoint, prompt: list[int], num_drafts: int) -> tuple[list[int], torch.Tensor]:
    """Greedy MTP drafts after ``prompt`` (and the target's next token), and the first draft's logits."""
    fc, (norm_e, norm_h, norm), layer = transformers_head(ref, checkpoint)
    out = ref(torch.tensor([prompt]), output_hidden_states=True, use_cache=False)
    sampled = int(out.logits[0, -1].argmax())
    hidden = ref.model(torch.tensor([prompt])).last_hidden_state[0]  # [n, H], after the final norm
    tokens = prompt[1:] + [sampled]
    drafts, first_logits = [], None
    for _ in range(num_drafts):
        n = len(tokens)
        x = fc(torch.cat([norm_e(ref.model.embed_tokens(torch.tensor(tokens))), norm_h(hidden)], dim=-1))[None]
        position_ids = torch.arange(n)[None]
        mask = create_causal_mask(config=layer.self_attn.config, inputs_embeds=x, attention_mask=None, cache=None,
                                  position_ids=position_ids)  # fmt: skip
        y = norm(layer(x, position_embeddings=ref.model.rotary_emb(x, position_ids), attention_mask=mask,
                       position_ids=position_ids)[0])  # fmt: skip
        logits = ref.lm_head(y[-1])
        first_logits = logits if first_logits is None else first_logits
        drafts.append(int(logits.argmax()))
        # The next draft: the head's own output at the last position stands in for the target's hidden state.
        tokens, hidden = tokens + [drafts[-1]], torch.cat([hidden, y[-1:]])
    return drafts, first_logits


@pytest.fixture(scope="module")
def qwen3_next(tmp_path_factory):
    path = make_checkpoint(tmp_path_factory.mktemp("mtp"), arch="qwen3_next")
    return path, reference_model(path)


def test_mtp_drafts_equal_the_head_built_from_transformers_modules(qwen3_next):
    checkpoint, ref = qwen3_next
    (prompt,) = random_prompts([11], seed=21)
    engine = LLMEngine(model=str(checkpoint), dtype="float32", block_size=4, speculative_config=MTP)
    engine.add_request("0", prompt, SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True))
    engine.step()  # the prompt, its first token, and the drafts of the next step
    (seq,) = engine.scheduler.running
    proposer = engine.runner.speculator.proposer
    expected, expected_logits = reference_drafts(ref, checkpoint, prompt, 3)
    assert seq.spec_token_ids == expected
    logits = engine.runner.model.compute_logits(proposer._last[seq.seq_id][0][None])[0]
    assert rel_err(logits, expected_logits) < 1e-5


@pytest.mark.parametrize("arch", ["qwen3_next", "qwen3_5"])
def test_mtp_drafts_give_the_greedy_tokens_with_chunks_preemption_and_hits(arch, qwen3_next, tmp_path):
    checkpoint = qwen3_next[0] if arch == "qwen3_next" else make_checkpoint(tmp_path, arch=arch)
    reference = GreedyReference(qwen3_next[1] if arch == "qwen3_next" else reference_model(checkpoint))
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    prompts = random_prompts([14, 14, 9, 14], seed=22)
    llm = spec_llm(checkpoint, MTP, max_num_batched_tokens=7, num_kv_blocks=10)
    outs = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert outs == [reference(p, 8) for p in prompts]
    stats = llm.get_metrics()
    assert stats["num_preemptions"] > 0 and stats["mixed_steps"] > 0 and stats["spec_decode_num_draft_tokens"] > 0
    assert_all_free(stats)
    # A continuation hits the checkpoint the first request left (the head's KV comes with the shared blocks).
    llm = spec_llm(checkpoint, MTP)
    follow = prompts[0] + outs[0] + [3, 4]
    for prompt in (prompts[0], follow):
        assert llm.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids == reference(prompt, 8)
    assert llm.get_metrics()["prefix_cache_hits"] == 1


def test_mtp_on_a_model_without_an_mtp_head_is_a_clear_error(tmp_path):
    checkpoint = make_checkpoint(tmp_path)  # Kimi-Linear
    with pytest.raises(ValueError, match="method 'mtp' needs a Qwen3-Next / Qwen3.5 checkpoint with an mtp"):
        spec_llm(checkpoint, MTP)
