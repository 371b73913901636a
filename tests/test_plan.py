"""``deltaserve plan``: printed byte counts against numbers worked out by hand from config.json."""

import json
from pathlib import Path

import pytest

from deltaserve.cli import main

CONFIG_48B = str(Path(__file__).parent / "data" / "kimi-linear-48b-a3b-config.json")
CONFIG_80B = str(Path(__file__).parent / "data" / "qwen3-next-80b-a3b-config.json")

# Qwen3-Next-80B-A3B's linear/attention sizes (the rest left at transformers' defaults).
QWEN3_NEXT = {
    "model_type": "qwen3_next",
    "num_hidden_layers": 8,
    "num_attention_heads": 16,
    "num_key_value_heads": 2,
    "head_dim": 256,
    "linear_num_key_heads": 16,
    "linear_num_value_heads": 32,
    "linear_key_head_dim": 128,
    "linear_value_head_dim": 128,
    "linear_conv_kernel_dim": 4,
    "dtype": "bfloat16",
}


def plan(capsys, *args):
    code = main(["plan", *args])
    out, err = capsys.readouterr()
    return code, out, err


def row(out, kind):
    """The cells of the table row that starts with ``kind``."""
    for line in out.splitlines():
        cells = line.split()
        if cells and cells[0] == kind:
            return cells
    raise AssertionError(f"no row {kind!r} in:\n{out}")


def test_48b_tp1_kda_state_bytes_per_layer_per_request(capsys):
    code, out, _ = plan(capsys, "--config", CONFIG_48B, "--tp", "1", "--num-requests", "4")
    assert code == 0
    # kind, layers, conv shape, conv dtype, conv, recurrent shape, rec dtype, recurrent, total
    assert row(out, "kda") == ["kda", "20", "3x12288", "bfloat16", "73,728", "32x128x128", "float32", "2,097,152", "2,170,880"]
    assert f"per request: {20 * 2_170_880:,} bytes" in out  # 43,417,600
    assert f"4 requests: {4 * 20 * 2_170_880:,} bytes" in out


def test_48b_mla_latent_bytes_per_token_are_not_divided_by_tp(capsys):
    for tp in ("1", "4"):
        _, out, _ = plan(capsys, "--config", CONFIG_48B, "--tp", tp)
        # (kv_lora_rank 512 + qk_rope_head_dim 64) x 2 bytes, 7 full-attention layers.
        assert row(out, "mla")[:4] == ["mla", "7", "1,152", "8,064"]
        assert "not divided by TP" in out


def test_48b_tp2_halves_conv_and_recurrent(capsys):
    _, out, _ = plan(capsys, "--config", CONFIG_48B, "--tp", "2")
    assert row(out, "kda")[2:] == ["3x6144", "bfloat16", "36,864", "16x128x128", "float32", "1,048,576", "1,085,440"]


def test_num_spec_and_ds_layout_and_cache_dtype(capsys):
    _, out, _ = plan(
        capsys, "--config", CONFIG_48B, "--num-spec", "2", "--conv-layout", "DS", "--cache-dtype", "float32"
    )
    # state_len = 4 - 1 + 2 = 5, dim first; fp32 conv; the recurrent state stays fp32.
    assert row(out, "kda")[2:] == ["12288x5", "float32", "245,760", "32x128x128", "float32", "2,097,152", "2,342,912"]
    assert row(out, "mla")[2] == "2,304"


def test_checkpoint_dir_is_read_through_its_config_json(tmp_path, capsys):
    (tmp_path / "config.json").write_text(Path(CONFIG_48B).read_text())
    code, out, _ = plan(capsys, "--config", str(tmp_path))
    assert code == 0 and row(out, "kda")[-1] == "2,170,880"


@pytest.mark.parametrize("tp, kv_bytes", [("1", "2,048"), ("4", "1,024")])
def test_qwen3_next_gdn_and_attention_kv(tmp_path, capsys, tp, kv_bytes):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(QWEN3_NEXT))
    code, out, _ = plan(capsys, "--config", str(path), "--tp", tp)
    assert code == 0
    n = int(tp)
    conv = 3 * (2 * 16 * 128 + 32 * 128) // n * 2
    recurrent = 32 // n * 128 * 128 * 4  # the engine's default recurrent dtype: float32
    assert row(out, "gdn")[1] == "6"  # every 4th of 8 layers is full attention
    assert row(out, "gdn")[4::3] == [f"{conv:,}", f"{recurrent:,}"]
    # 2 KV heads x 256 x (K and V) x bf16; at tp = 4 the 2 heads are replicated to 1 per rank.
    assert row(out, "attention")[:3] == ["attention", "2", kv_bytes]


def test_80b_tp1_gdn_state_and_attention_kv_bytes(capsys):
    code, out, _ = plan(capsys, "--config", CONFIG_80B)
    assert code == 0
    # conv 3 x (2 x 16 x 128 + 32 x 128 = 8,192) bf16; recurrent 32 x 128 x 128 float32 (the engine's default).
    assert row(out, "gdn") == ["gdn", "36", "3x8192", "bfloat16", "49,152", "32x128x128", "float32", "2,097,152", "2,146,304"]
    # K and V of 2 heads x 256, bf16, in each of the 12 attention layers.
    assert row(out, "attention")[:4] == ["attention", "12", "2,048", "24,576"]


def test_80b_bfloat16_recurrent_state_is_the_opt_in_and_config_mamba_ssm_dtype_is_followed(tmp_path, capsys):
    _, out, _ = plan(capsys, "--config", CONFIG_80B, "--mamba-ssm-cache-dtype", "bfloat16")
    assert row(out, "gdn")[6:] == ["bfloat16", "1,048,576", "1,097,728"]
    config = json.loads(Path(CONFIG_80B).read_text()) | {"mamba_ssm_dtype": "bfloat16"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    _, out, _ = plan(capsys, "--config", str(tmp_path))
    assert row(out, "gdn")[6] == "bfloat16"


@pytest.mark.parametrize("text_config", [False, True])
def test_qwen3_5_moe_text_and_vision_language_configs(tmp_path, capsys, text_config):
    text = {k: v for k, v in QWEN3_NEXT.items() if k != "model_type"} | {"model_type": "qwen3_5_moe_text"}
    config = {"model_type": "qwen3_5_moe", "text_config": text} if text_config else text
    (tmp_path / "config.json").write_text(json.dumps(config))
    code, out, _ = plan(capsys, "--config", str(tmp_path))
    assert code == 0 and row(out, "gdn")[4::3] == ["49,152", "2,097,152"]


def test_default_is_the_builtin_tiny_model(capsys):
    code, out, _ = plan(capsys)
    assert code == 0 and "built-in tiny model" in out and row(out, "kda")


@pytest.mark.parametrize("tp, names", [("64", "num_heads = 32 is not divisible by tp_size = 64"), ("3", "tp_size = 3")])
def test_impossible_tp_is_a_one_line_error_with_exit_code_2(capsys, tp, names):
    code, out, err = plan(capsys, "--config", CONFIG_48B, "--tp", tp)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and names in err


def test_unknown_architecture_is_a_one_line_error_with_exit_code_2(tmp_path, capsys):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    code, _, err = plan(capsys, "--config", str(path))
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "model_type 'llama' is not supported" in err


def test_missing_config_is_an_error_with_exit_code_2(tmp_path, capsys):
    code, _, err = plan(capsys, "--config", str(tmp_path / "nope.json"))
    assert code == 2 and "no such file" in err
