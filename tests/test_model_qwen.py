"""Qwen3-Next, Qwen3.5 and Qwen3.5-MoE on tiny checkpoints vs transformers' models (float32, CPU).

Our models run the engine's way (flat varlen batches, a state pool, a paged K/V cache with block tables
assigned by hand); transformers runs one full forward per sequence without cache. The tiny configs
have GVA (4 value heads on 2 key heads), rotary on half of each head, GQA, and both GDN projection
layouts (Qwen3-Next fused, Qwen3.5 split).
"""

from __future__ import annotations

import json
import logging

import pytest
import torch
from conftest import rel_err
from helpers_model import GDN_ARCHS, ModelRunner, make_checkpoint, reference_logits, reference_model
from safetensors.torch import load_file, save_file

from deltaserve.models.loader import load_model

BOUND = 1e-5  # measured: about 3e-7 (the issue asks for 1e-4)


def prompt(n: int, seed: int) -> list[int]:
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture(scope="module", params=GDN_ARCHS)
def tiny(request, tmp_path_factory):
    """(arch, checkpoint path, our model, transformers' model)."""
    path = make_checkpoint(tmp_path_factory.mktemp(request.param), arch=request.param)
    return request.param, path, load_model(path), reference_model(path)


def test_prompt_logits_match_transformers(tiny):
    _, _, ours, ref = tiny
    ids = prompt(19, seed=1)
    logits = ModelRunner(ours).step([("a", ids)])[0]
    expected = reference_logits(ref, ids)
    assert logits.shape == expected.shape and rel_err(logits, expected) < BOUND


def test_chunks_decodes_and_mixed_batches_match_transformers(tiny):
    _, _, ours, ref = tiny
    a, b, c = prompt(11, seed=2), prompt(8, seed=3), prompt(1, seed=4)
    runner = ModelRunner(ours)
    a_out = runner.step([("a", a[:6])])
    # a's second chunk beside b's first chunk and c's whole prompt, then decodes beside a prefill
    mixed = runner.step([("b", b[:5]), ("a", a[6:9]), ("c", c)])
    both = runner.step([("a", [a[9]]), ("b", b[5:])])
    last = runner.step([("a", [a[10]])])
    assert rel_err(torch.cat([a_out[0], mixed[1], both[0], last[0]]), reference_logits(ref, a)) < BOUND
    assert rel_err(torch.cat([mixed[0], both[1]]), reference_logits(ref, b)) < BOUND
    assert rel_err(mixed[2], reference_logits(ref, c)) < BOUND


def test_unused_state_slots_and_kv_blocks_stay_untouched(tiny):
    _, _, ours, _ = tiny
    runner = ModelRunner(ours, num_slots=4, num_blocks=16)
    pool = runner.pool
    assert list(pool.groups) == ["gdn"]
    pool.conv["gdn"][:, 2:] = 1e30  # slots 2..4 are never allocated: a sentinel
    pool.recurrent["gdn"][:, 2:] = 1e30
    runner.step([("a", prompt(6, seed=9))])
    runner.step([("a", [5])])
    assert (pool.conv["gdn"][:, 2:] == 1e30).all() and (pool.recurrent["gdn"][:, 2:] == 1e30).all()
    unused = [b for b in range(16) if b not in runner.seqs["a"]["blocks"]]
    assert runner.kv_cache[:, unused].isnan().all()


def test_cache_specs_follow_the_config(tiny):
    arch, _, ours, _ = tiny
    group = ours.state_groups(cache_dtype="bfloat16", num_spec=2, conv_layout="DS")["gdn"]
    # 3 GDN layers; conv [q 2x16 | k 2x16 | v 4x8]; recurrent (Hv, Dv, Dk); float32 whatever the cache dtype.
    assert group.num_layers == 3 and group.layout.conv_split == (32, 32, 32) and group.layout.conv_shape == (96, 5)
    assert group.layout.recurrent_shape == (4, 8, 16) and group.layout.recurrent_dtype == torch.float32
    assert ours.state_groups(mamba_ssm_cache_dtype="bfloat16")["gdn"].layout.recurrent_dtype == torch.bfloat16
    spec = ours.kv_cache_spec()
    assert (spec.kind, spec.num_layers, spec.entry_dim, spec.bytes_per_token) == ("gqa", 1, 2 * 2 * 16, 2 * 2 * 16 * 4)


def test_config_mamba_ssm_dtype_sets_the_default_recurrent_dtype(tmp_path):
    path = make_checkpoint(tmp_path, arch="qwen3_5", mamba_ssm_dtype="bfloat16")
    model = load_model(path, dtype="bfloat16")
    assert model.state_groups()["gdn"].layout.recurrent_dtype == torch.bfloat16
    assert model.state_groups(mamba_ssm_cache_dtype="float32")["gdn"].layout.recurrent_dtype == torch.float32


def test_fused_and_per_expert_checkpoints_load_the_same_model(tmp_path):
    fused_path = make_checkpoint(tmp_path, arch="qwen3_5_moe")
    tensors = load_file(fused_path / "model.safetensors")
    per_expert = {}
    for name, tensor in tensors.items():
        prefix, _, kind = name.rpartition("experts.")
        if kind == "gate_up_proj":
            for e, (gate, up) in enumerate(t.chunk(2) for t in tensor):
                per_expert[f"{prefix}experts.{e}.gate_proj.weight"] = gate.contiguous()
                per_expert[f"{prefix}experts.{e}.up_proj.weight"] = up.contiguous()
        elif kind == "down_proj":
            per_expert.update({f"{prefix}experts.{e}.down_proj.weight": t.contiguous() for e, t in enumerate(tensor)})
        else:
            per_expert[name] = tensor
    assert len(per_expert) == len(tensors) + 5 * (3 * 8 - 2)  # 4 MoE layers and the mtp.* head's, of 8 experts
    fused = load_model(fused_path)
    save_file(per_expert, str(fused_path / "model.safetensors"))
    ids = prompt(9, seed=11)
    assert torch.equal(ModelRunner(fused).step([("a", ids)])[0], ModelRunner(load_model(fused_path)).step([("a", ids)])[0])


def vision_language_checkpoint(text: str, dst, arch: str) -> None:
    """A Qwen3.5 VL checkpoint from a text one: text under model.language_model., a vision tensor, MTP kept."""
    dst.mkdir()
    config = json.loads((text / "config.json").read_text())
    model_type = config.pop("model_type").removesuffix("_text")
    config.pop("architectures")
    vl = {"architectures": [arch], "model_type": model_type, "text_config": config, "dtype": "float32"}
    (dst / "config.json").write_text(json.dumps(vl))
    tensors = load_file(text / "model.safetensors")
    renamed = {n.replace("model.", "model.language_model.", 1) if n.startswith("model.") else n: t for n, t in tensors.items()}
    renamed["model.visual.patch_embed.proj.weight"] = torch.randn(8, 3, 2, 2)
    save_file(renamed, str(dst / "model.safetensors"))


@pytest.mark.parametrize("arch, vl_arch", [("qwen3_5", "Qwen3_5ForConditionalGeneration"),
                                           ("qwen3_5_moe", "Qwen3_5MoeForConditionalGeneration")])  # fmt: skip
def test_vision_language_checkpoint_serves_its_text_model(tmp_path, caplog, arch, vl_arch):
    text = make_checkpoint(tmp_path, arch=arch)
    vision_language_checkpoint(text, tmp_path / "vl", vl_arch)
    with caplog.at_level(logging.INFO, logger="deltaserve.models.loader"):
        vl = load_model(tmp_path / "vl")
    assert type(vl).__name__ == vl_arch and hasattr(vl.model, "language_model")
    skipped = [r.getMessage() for r in caplog.records if "skipping" in r.getMessage()]
    assert len(skipped) == 2 and any("model.visual." in m and "vision tower" in m for m in skipped), skipped
    ids = prompt(10, seed=12)
    assert torch.equal(ModelRunner(vl).step([("a", ids)])[0], ModelRunner(load_model(text)).step([("a", ids)])[0])


def test_missing_and_misshaped_tensors_are_named(tmp_path):
    path = make_checkpoint(tmp_path, arch="qwen3_next")
    tensors = load_file(path / "model.safetensors")
    del tensors["model.layers.1.linear_attn.in_proj_ba.weight"]
    tensors["model.layers.2.self_attn.q_proj.weight"] = torch.zeros(64, 64)
    tensors["model.layers.9.mlp.gate.weight"] = torch.zeros(8, 64)
    save_file(tensors, str(path / "model.safetensors"))
    with pytest.raises(ValueError) as info:
        load_model(path)
    message = str(info.value)
    assert "model.layers.1.linear_attn.in_proj_ba.weight (expected shape [8, 64])" in message
    assert "model.layers.2.self_attn.q_proj.weight: expected shape [128, 64], found [64, 64]" in message
    assert "unexpected tensors (1):\n  model.layers.9.mlp.gate.weight" in message
    assert "mtp." not in message


@pytest.mark.parametrize("field, value, names", [
    ("linear_num_value_heads", 3, "linear_num_value_heads = 3 must be a multiple of linear_num_key_heads = 2"),
    ("num_key_value_heads", 3, "num_attention_heads = 4 must be a multiple of num_key_value_heads = 3"),
    ("rope_parameters", {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.05},
     "partial_rotary_factor = 0.05 gives 0 rotary channels of head_dim 16"),
    ("rope_parameters", {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}, "rope_type 'yarn' is not supported"),
])  # fmt: skip
def test_impossible_configs_are_named(tmp_path, field, value, names):
    from deltaserve.models.loader import load_model_config

    with pytest.raises(ValueError, match=names):
        load_model_config(make_checkpoint(tmp_path, arch="qwen3_next", **{field: value}))


def test_published_80b_config_passes_and_gives_its_cache_sizes(tmp_path):
    import shutil
    from pathlib import Path

    from deltaserve.models.loader import load_model_config
    from deltaserve.models.qwen3_next import Qwen3NextForCausalLM

    shutil.copy(Path(__file__).parent / "data" / "qwen3-next-80b-a3b-config.json", tmp_path / "config.json")
    config = load_model_config(tmp_path)
    with torch.device("meta"):
        model = Qwen3NextForCausalLM(config, torch.bfloat16)
    attention = model.model.layers[3].self_attn
    assert (attention.num_heads, attention.num_kv_heads, attention.rotary_emb.rotary_dim) == (16, 2, 64)
    assert attention.rotary_emb.rope_theta == 1e7
    spec = model.kv_cache_spec()
    assert (spec.num_layers, spec.bytes_per_token) == (12, 2048)
    group = model.state_groups()["gdn"]
    assert group.num_layers == 36 and group.layout.bytes_per_slot == 49_152 + 2_097_152


def test_bfloat16_model_keeps_gdn_decay_and_norm_in_float32_and_stays_close(tiny):
    arch, path, _, ref = tiny
    ours = load_model(path, dtype="bfloat16")
    fp32 = {n for n, p in ours.named_parameters() if p.dtype == torch.float32}
    assert fp32 and all(n.endswith(("A_log", "dt_bias", "linear_attn.norm.weight")) for n in fp32), fp32
    # NOTE: a prompt without near-ties in routing: on others (seed 1) an expert choice flips in bfloat16,
    # for transformers' own bfloat16 model as for ours (both then ~5% off the float32 logits).
    ids = prompt(12, seed=3)
    err = rel_err(ModelRunner(ours).step([("a", ids)])[0], reference_logits(ref, ids))
    assert err < 2e-2, (arch, err)


def test_tied_word_embeddings_load_without_an_lm_head_tensor(tmp_path):
    path = make_checkpoint(tmp_path, arch="qwen3_5", tie_word_embeddings=True)
    tensors = load_file(path / "model.safetensors")
    del tensors["lm_head.weight"]
    save_file(tensors, str(path / "model.safetensors"))
    model = load_model(path)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ref = reference_model(path)
    ids = prompt(8, seed=13)
    assert rel_err(ModelRunner(model).step([("a", ids)])[0], reference_logits(ref, ids)) < BOUND
