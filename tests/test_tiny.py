"""The built-in tiny checkpoint: deterministic, real format, a loadable byte-level tokenizer, the CLI."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from deltaserve.cli import main
from deltaserve.models import tiny
from deltaserve.models.tiny import default_tiny_model, make_tiny


def test_same_seed_gives_byte_identical_files(tmp_path):
    a, b = make_tiny(tmp_path / "a", seed=3), make_tiny(tmp_path / "b", seed=3)
    files = sorted(p.name for p in a.iterdir())
    assert "model.safetensors" in files and files == sorted(p.name for p in b.iterdir())
    for name in files:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_another_seed_gives_other_weights(tmp_path):
    a = load_file(make_tiny(tmp_path / "a", seed=0) / "model.safetensors")
    b = load_file(make_tiny(tmp_path / "b", seed=1) / "model.safetensors")
    assert not torch.equal(a["lm_head.weight"], b["lm_head.weight"])


def test_checkpoint_is_small_and_in_the_real_format(tmp_path):
    path = make_tiny(tmp_path / "t")
    assert (path / "model.safetensors").stat().st_size < 4 * 2**20
    config = json.loads((path / "config.json").read_text())
    assert config["architectures"] == ["KimiLinearForCausalLM"] and config["model_type"] == "kimi_linear"
    assert config["linear_attn_config"]["full_attn_layers"] == [3]
    names = set(load_file(path / "model.safetensors"))
    expected = {
        "model.layers.0.self_attn.q_conv1d.weight",
        "model.layers.0.self_attn.A_log",
        "model.layers.0.mlp.gate_proj.weight",
        "model.layers.2.self_attn.kv_a_proj_with_mqa.weight",
        "model.layers.3.block_sparse_moe.experts.7.w2.weight",
        "model.layers.3.block_sparse_moe.gate.e_score_correction_bias",
        "lm_head.weight",
    }
    assert expected <= names


def test_tokenizer_round_trips_text_and_matches_the_config_ids(tmp_path):
    path = make_tiny(tmp_path / "t")
    tok = AutoTokenizer.from_pretrained(path)
    config = json.loads((path / "config.json").read_text())
    text = "Linear attention, état récurrent: 線形 ✓\n\ttabs"
    ids = tok(text)["input_ids"]
    assert ids == list(text.encode("utf-8"))  # one token per byte
    assert tok.decode(ids) == text
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (
        config["bos_token_id"], config["eos_token_id"], config["pad_token_id"],
    )  # fmt: skip
    assert len(tok) <= config["vocab_size"]
    assert tok.decode([tok.eos_token_id]) == "<|eos|>"


def test_cli_make_tiny_writes_the_checkpoint(tmp_path, capsys):
    assert main(["make-tiny", str(tmp_path / "cli"), "--seed", "2"]) == 0
    written = (tmp_path / "cli" / "model.safetensors").read_bytes()
    assert written == (make_tiny(tmp_path / "direct", seed=2) / "model.safetensors").read_bytes()
    assert "cli" in capsys.readouterr().out


def test_default_tiny_model_is_created_once_in_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DELTASERVE_CACHE", str(tmp_path))
    calls = []
    real = tiny.make_tiny
    monkeypatch.setattr(tiny, "make_tiny", lambda *a, **k: calls.append(1) or real(*a, **k))
    first = default_tiny_model()
    assert first == tmp_path / "tiny-kimi-linear" and (first / "model.safetensors").is_file()
    assert default_tiny_model() == first and len(calls) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["tiny-kimi-linear"]  # no temporary folders left


def test_make_tiny_arch_writes_each_family(tmp_path, capsys):
    expected = {"qwen3_next": "Qwen3NextForCausalLM", "qwen3_5_moe": "Qwen3_5MoeForCausalLM"}
    for arch, architecture in expected.items():
        assert main(["make-tiny", str(tmp_path / arch), "--arch", arch]) == 0
        assert f"wrote tiny {arch} checkpoint" in capsys.readouterr().out
        assert json.loads((tmp_path / arch / "config.json").read_text())["architectures"] == [architecture]
    names = set(load_file(tmp_path / "qwen3_next" / "model.safetensors"))
    assert "model.layers.0.linear_attn.in_proj_qkvz.weight" in names and "mtp.fc.weight" in names
    names = set(load_file(tmp_path / "qwen3_5_moe" / "model.safetensors"))
    assert {"model.layers.0.linear_attn.in_proj_qkv.weight", "model.layers.0.mlp.experts.gate_up_proj"} <= names
