"""``deltaserve plan --tp N`` per-rank layouts against the layout calculators and hand-worked sizes:
Kimi-Linear-48B at TP 1/2/4/8 (also against the model's own layers built as rank 0 of N, on the
meta device) and Qwen3-Next-80B at TP 1/2/4/8/16."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from deltaserve.cli import main
from deltaserve.distributed.parallel_state import tp_layout
from deltaserve.models.loader import load_model_config
from deltaserve.models.registry import resolve
from deltaserve.state.layout import gdn_layout, kda_layout

KIMI_48B = Path(__file__).parent / "data" / "kimi-linear-48b-a3b-config.json"
QWEN3_NEXT_80B = Path(__file__).parent / "data" / "qwen3-next-80b-a3b-config.json"


def plan_rows(capsys, config: Path, tp: int) -> dict[str, list[str]]:
    assert main(["plan", "--config", str(config), "--tp", str(tp)]) == 0
    rows = {}
    for line in capsys.readouterr().out.splitlines():
        cells = line.split()
        if cells and cells[0] in ("kda", "gdn", "mla", "attention"):
            rows[cells[0]] = cells
    return rows


def shape(text: str) -> tuple[int, ...]:
    return tuple(int(n) for n in text.split("x"))


@pytest.fixture(scope="module")
def kimi_48b_config(tmp_path_factory):
    path = tmp_path_factory.mktemp("kimi48b")
    (path / "config.json").write_text(KIMI_48B.read_text())
    return load_model_config(path)


@pytest.mark.parametrize("tp", [1, 2, 4, 8])
def test_kimi_48b_per_rank_layouts(capsys, kimi_48b_config, tp):
    kda = plan_rows(capsys, KIMI_48B, tp)["kda"]
    layout = kda_layout(32, 128, conv_kernel_size=4, tp_size=tp, model_dtype=torch.bfloat16)
    # 32 heads x 128: conv [3 inputs, q|k|v of 4096/tp each], recurrent (32/tp heads, 128, 128).
    assert shape(kda[2]) == layout.conv_shape == (3, 3 * 4096 // tp)
    assert shape(kda[5]) == layout.recurrent_shape == (32 // tp, 128, 128)
    assert kda[-1] == f"{layout.bytes_per_slot:,}" == f"{3 * 3 * 4096 // tp * 2 + 32 // tp * 128 * 128 * 4:,}"
    # The model's layers built as rank 0 of tp hold exactly these heads and channels.
    c = kimi_48b_config
    with tp_layout(0, tp), torch.device("meta"):
        model = resolve(c)(c, torch.bfloat16)
    kda_layer = model.model.layers[model.linear_layer_ids[0]].self_attn
    width = kda_layer.q_proj.weight.shape[0]
    assert (3, 3 * width) == layout.conv_shape and kda_layer.A_log.shape[2] == layout.recurrent_shape[0]
    groups = model.state_groups(tp_size=tp)
    assert groups["kda"].layout == layout
    mla = model.model.layers[model.attn_layer_ids[0]].self_attn
    assert mla.num_heads == 32 // tp and mla.kv_a_proj_with_mqa.weight.shape[0] == 512 + 64  # latent replicated


@pytest.fixture(scope="module")
def qwen3_next_80b_config(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen80b")
    (path / "config.json").write_text(QWEN3_NEXT_80B.read_text())
    return load_model_config(path)


@pytest.mark.parametrize("tp", [1, 2, 4, 8, 16])
def test_qwen3_next_80b_per_rank_layouts(capsys, qwen3_next_80b_config, tp):
    rows = plan_rows(capsys, QWEN3_NEXT_80B, tp)
    config = json.loads(QWEN3_NEXT_80B.read_text())
    layout = gdn_layout(16, 32, 128, 128, conv_kernel_size=4, tp_size=tp, model_dtype=torch.bfloat16)
    # 16 key heads (q, k: 2048/tp channels each) and 32 value heads (v: 4096/tp), 128-dim heads.
    assert layout.conv_split == (2048 // tp, 2048 // tp, 4096 // tp)
    assert shape(rows["gdn"][2]) == layout.conv_shape == (3, 8192 // tp)
    assert shape(rows["gdn"][5]) == layout.recurrent_shape == (32 // tp, 128, 128)
    assert rows["gdn"][1] == str(config["num_hidden_layers"] * 3 // 4)
    # 2 KV heads x head_dim 256 x (K, V) x bf16, split up to TP 2 and replicated (1 a rank) beyond.
    kv_heads = max(1, 2 // tp)
    assert rows["attention"][2] == f"{2 * kv_heads * 256 * 2:,}"
    # The model's layers built as rank 0 of tp (meta device) hold exactly these heads and channels.
    c = qwen3_next_80b_config
    with tp_layout(0, tp), torch.device("meta"):
        model = resolve(c)(c, torch.bfloat16)
    gdn = model.model.layers[model.linear_layer_ids[0]].linear_attn
    assert gdn.conv_split == layout.conv_split and gdn.recurrent_shape == layout.recurrent_shape
    assert model.state_groups(tp_size=tp, mamba_ssm_cache_dtype="bfloat16")["gdn"].layout == layout
    attn = model.model.layers[model.attn_layer_ids[0]].self_attn
    assert (attn.num_heads, attn.num_kv_heads) == (16 // tp, kv_heads)
    assert f"{model.kv_cache_spec().bytes_per_token:,}" == rows["attention"][2]
