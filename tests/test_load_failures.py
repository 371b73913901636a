"""Hostile or broken checkpoints and command lines: each is one clear line and a non-zero exit,
checked before anything large is allocated."""

from __future__ import annotations

import json
import time

import pytest
import torch
from helpers_model import make_checkpoint
from safetensors.torch import load_file, save_file

from deltaserve.cli import main
from deltaserve.models.loader import load_model, load_model_config


@pytest.fixture
def ckpt(tmp_path):
    return make_checkpoint(tmp_path)


def edit_config(path, **changes) -> None:
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("changes, field", [
    ({"vocab_size": 10**10}, "vocab_size"),
    ({"num_hidden_layers": 10**7}, "num_hidden_layers"),
    ({"hidden_size": 2**40}, "hidden_size"),
    ({"num_experts": 10**9}, "num_experts"),
    ({"vocab_size": True}, "vocab_size"),
    ({"linear_attn_config": {"num_heads": 10**9, "head_dim": 8, "kda_layers": [1], "full_attn_layers": [2]}},
     "linear_attn_config.num_heads"),
])
def test_huge_config_sizes_are_refused_before_any_allocation(ckpt, changes, field):
    edit_config(ckpt, **changes)
    start = time.monotonic()
    with pytest.raises(ValueError) as err:
        load_model_config(ckpt)
    message = str(err.value)
    assert f"{field} must be an integer in" in message and len(message) < 300
    assert time.monotonic() - start < 5


def test_a_shard_outside_the_checkpoint_folder_is_refused(ckpt, tmp_path):
    tensors = load_file(ckpt / "model.safetensors")
    save_file(tensors, tmp_path / "elsewhere.safetensors")
    for shard in ("../elsewhere.safetensors", str(tmp_path / "elsewhere.safetensors")):
        (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {n: shard for n in tensors}}))
        with pytest.raises(ValueError, match="outside the checkpoint folder"):
            load_model(ckpt)
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {n: 5 for n in tensors}}))
    with pytest.raises(ValueError, match="names shard 5, which is not a file name"):
        load_model(ckpt)


def test_integer_weights_are_refused_naming_the_tensor(ckpt):
    tensors = load_file(ckpt / "model.safetensors")
    tensors["lm_head.weight"] = torch.zeros(tensors["lm_head.weight"].shape, dtype=torch.int64)
    save_file(tensors, ckpt / "model.safetensors")
    with pytest.raises(ValueError, match=r"tensor lm_head.weight has dtype I64; model weights must be floating point"):
        load_model(ckpt)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_nan_or_inf_weight_is_named_on_load(ckpt, value):
    tensors = load_file(ckpt / "model.safetensors")
    tensors["model.norm.weight"][3] = value
    save_file(tensors, ckpt / "model.safetensors")
    with pytest.raises(ValueError, match=r"tensor model.norm.weight holds 1 NaN or infinite value"):
        load_model(ckpt)


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def test_a_broken_tokenizer_file_is_one_line_and_exit_2(ckpt, capsys):
    (ckpt / "tokenizer.json").write_text("{not json")
    assert main(["generate", "--model", str(ckpt), "--max-tokens", "2", "hi"]) == 2
    assert "tokenizer" in one_line_error(capsys)


def test_an_unknown_dtype_is_one_line(ckpt, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["generate", "--model", str(ckpt), "--dtype", "float7", "hi"])
    assert exit_.value.code == 2 and "float7" in capsys.readouterr().err
    from deltaserve import LLM

    with pytest.raises(ValueError, match="dtype"):
        LLM(model=str(ckpt), dtype="float7")


@pytest.mark.parametrize("port", ["70000", "-1", "http"])
def test_a_port_out_of_range_is_refused_by_the_command_line(port, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["serve", "--port", port])
    assert exit_.value.code == 2 and "--port" in capsys.readouterr().err


def test_an_unwritable_path_is_one_line_and_non_zero(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["make-tiny", str(blocker / "sub")]) != 0
    assert "file" in one_line_error(capsys)


def test_serve_help_shows_the_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    out = capsys.readouterr().out
    assert "(default: 8000)" in out and "(default: 127.0.0.1)" in out and "--api-key" in out


def test_serve_start_up_log_names_the_model_and_its_capacities(ckpt, caplog):
    from deltaserve.cli import build_parser
    from deltaserve.commands.serve import build_server

    args = build_parser().parse_args(["serve", "--model", str(ckpt), "--max-model-len", "256", "--port", "0"])
    with caplog.at_level("INFO", logger="deltaserve.serve"):
        server = build_server(args)
    line = next(r.getMessage() for r in caplog.records if r.name == "deltaserve.serve")
    stats = server.engine_loop.engine.get_metrics()
    assert str(ckpt) in line and "max_model_len 256" in line
    assert f"{stats['state_slots_total']} state slots" in line and f"{stats['kv_blocks_total']} blocks" in line
