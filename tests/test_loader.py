"""Checkpoint loading: names and shapes checked exactly, sharded checkpoints, config validation, dtype."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from helpers_model import make_checkpoint
from safetensors.torch import load_file, save_file

from deltaserve.models.loader import load_model, load_model_config

DATA_CONFIG = "tests/data/kimi-linear-48b-a3b-config.json"


@pytest.fixture
def ckpt(tmp_path):
    return make_checkpoint(tmp_path)


def rewrite_weights(path, edit) -> None:
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors")


def edit_config(path, **changes) -> None:
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


def test_missing_tensor_is_named_with_its_expected_shape(ckpt):
    rewrite_weights(ckpt, lambda t: t.pop("model.layers.1.block_sparse_moe.experts.3.w2.weight"))
    with pytest.raises(ValueError, match=r"missing tensors \(1\)") as err:
        load_model(ckpt)
    assert "model.layers.1.block_sparse_moe.experts.3.w2.weight (expected shape [64, 32])" in str(err.value)


def test_wrong_shape_names_tensor_expected_and_found(ckpt):
    rewrite_weights(ckpt, lambda t: t.update({"model.layers.2.self_attn.kv_b_proj.weight": torch.zeros(64, 31)}))
    with pytest.raises(ValueError) as err:
        load_model(ckpt)
    assert "model.layers.2.self_attn.kv_b_proj.weight: expected shape [64, 32], found [64, 31]" in str(err.value)


def test_a_merged_projections_blocks_are_checked_by_their_own_names(ckpt):
    # NOTE: q_proj ... g_a_proj (KDA), gate_proj / up_proj, q_proj / kv_a_proj_with_mqa (MLA) are one weight
    # each in the model; the checkpoint's tensors are still checked one by one.
    def edit(t):
        t["model.layers.0.self_attn.f_a_proj.weight"] = torch.zeros(16, 63)
        t["model.layers.2.self_attn.kv_a_proj_with_mqa.weight"] = torch.zeros(41, 64)
        del t["model.layers.0.mlp.up_proj.weight"]

    rewrite_weights(ckpt, edit)
    with pytest.raises(ValueError) as err:
        load_model(ckpt)
    message = str(err.value)
    assert "model.layers.0.self_attn.f_a_proj.weight: expected shape [16, 64], found [16, 63]" in message
    assert "model.layers.2.self_attn.kv_a_proj_with_mqa.weight: expected shape [40, 64], found [41, 64]" in message
    assert "model.layers.0.mlp.up_proj.weight (expected shape [128, 64])" in message
    assert "in_proj" not in message and "gate_up_proj" not in message


def test_unexpected_tensor_is_named(ckpt):
    rewrite_weights(ckpt, lambda t: t.update({"model.layers.0.self_attn.rotary_emb.inv_freq": torch.zeros(4)}))
    with pytest.raises(ValueError, match=r"unexpected tensors \(1\)") as err:
        load_model(ckpt)
    assert "model.layers.0.self_attn.rotary_emb.inv_freq (shape [4])" in str(err.value)


def test_unknown_architecture_is_named_with_the_supported_ones(ckpt):
    edit_config(ckpt, architectures=["Qwen2ForCausalLM"])
    with pytest.raises(ValueError, match=r"unsupported architecture 'Qwen2ForCausalLM'.*KimiLinearForCausalLM"):
        load_model_config(ckpt)


def test_missing_config_json_is_an_error(ckpt):
    (ckpt / "config.json").unlink()
    with pytest.raises(ValueError, match="has no config.json"):
        load_model_config(ckpt)


@pytest.mark.parametrize(
    "linear_attn_config, message",
    [
        ({"kda_layers": [1, 2, 5], "full_attn_layers": [3]}, r"kda_layers has layer 5, out of range 1..4"),
        ({"kda_layers": [0, 1, 2], "full_attn_layers": [3]}, r"kda_layers has layer 0, out of range 1..4"),
        ({"kda_layers": [1, 2], "full_attn_layers": [3]}, r"layers \[4\] \(1-based\) are in neither"),
        ({"kda_layers": [1, 2, 3, 4], "full_attn_layers": [3]}, r"layer 3 is listed in both"),
    ],
)
def test_layer_lists_out_of_range_or_not_covering_all_layers_are_errors(ckpt, linear_attn_config, message):
    config = json.loads((ckpt / "config.json").read_text())
    config["linear_attn_config"].update(linear_attn_config)
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message):
        load_model_config(ckpt)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"num_experts_per_token": 9}, r"num_experts_per_tok = 9 exceeds num_experts = 8"),
        ({"num_expert_group": 3}, r"num_experts = 8 is not divisible by num_expert_group \(n_group\) = 3"),
        ({"topk_group": 3}, r"topk_group = 3 exceeds num_expert_group"),
        ({"kv_lora_rank": 0}, r"kv_lora_rank must be an integer >= 1, got 0"),
    ],
)
def test_impossible_sizes_are_errors_naming_the_field(ckpt, changes, message):
    edit_config(ckpt, **changes)
    with pytest.raises(ValueError, match=message):
        load_model_config(ckpt)


def test_published_48b_config_passes_and_gives_its_cache_sizes(tmp_path):
    shutil.copy(DATA_CONFIG, tmp_path / "config.json")
    config = load_model_config(tmp_path)
    assert config.layer_types.count("full_attention") == 7 and config.num_experts == 256
    from deltaserve.models.kimi_linear import KimiLinearForCausalLM

    with torch.device("meta"):
        model = KimiLinearForCausalLM(config, torch.bfloat16)
    spec = model.kv_cache_spec()
    assert (spec.num_layers, spec.entry_dim, spec.dtype) == (7, 576, torch.bfloat16)
    group = model.state_groups()["kda"]
    assert group.num_layers == 20 and group.layout.conv_dim == 12288


def test_sharded_checkpoint_loads_the_same_weights(ckpt, tmp_path):
    single = load_model(ckpt)
    tensors = load_file(ckpt / "model.safetensors")
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, shard_names in shards.items():
        save_file({n: tensors[n] for n in shard_names}, ckpt / file)
    weight_map = {n: file for file, shard_names in shards.items() for n in shard_names}
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (ckpt / "model.safetensors").unlink()
    sharded = load_model(ckpt)
    ours, theirs = dict(single.named_parameters()), dict(sharded.named_parameters())
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[n], theirs[n]) for n in ours)


def test_missing_shard_file_is_named(ckpt):
    index = {"metadata": {}, "weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}}
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="names shard model-00002-of-00002.safetensors"):
        load_model(ckpt)


def test_dtype_auto_follows_the_config_and_defaults_to_bfloat16(ckpt):
    assert load_model(ckpt).lm_head.weight.dtype == torch.float32
    config = json.loads((ckpt / "config.json").read_text())
    del config["dtype"], config["torch_dtype"]
    (ckpt / "config.json").write_text(json.dumps(config))
    model = load_model(ckpt)
    assert model.lm_head.weight.dtype == torch.bfloat16
    assert model.model.layers[0].self_attn.A_log.dtype == torch.float32
    tensors = load_file(ckpt / "model.safetensors")
    assert torch.equal(model.lm_head.weight, tensors["lm_head.weight"].to(torch.bfloat16))


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupted_safetensors_file_is_named(ckpt, damage):
    weights = ckpt / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"not a checkpoint" * 8)
    with pytest.raises(ValueError, match="model.safetensors is not a readable safetensors file"):
        load_model(ckpt)
