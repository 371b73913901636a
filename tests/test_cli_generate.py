"""``deltaserve generate`` and ``deltaserve bench`` end to end on a tiny checkpoint."""

from __future__ import annotations

import argparse
import re

import pytest
from transformers import AutoTokenizer

from deltaserve.cli import main
from deltaserve.commands.bench import make_workload
from helpers_engine import GreedyReference
from helpers_model import make_checkpoint, reference_model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("cli"))


def test_generate_prints_transformers_greedy_completion_and_speed(checkpoint, capsys):
    prompt = "The state of a linear attention layer"
    argv = ["--dtype", "float32", "--max-tokens", "6", "--ignore-eos", prompt]
    code = main(["generate", "--model", str(checkpoint), *argv])
    assert code == 0
    out = capsys.readouterr().out
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    expected = GreedyReference(reference_model(checkpoint))(tokenizer.encode(prompt), 6)
    assert f"prompt:     {prompt!r}\ncompletion: {tokenizer.decode(expected, skip_special_tokens=True)!r}\n" in out
    assert "[6 tokens, finish_reason=length]" in out
    assert re.search(r"generated 6 tokens in [\d.]+ s \([\d.]+ tok/s\)", out)


def test_generate_reports_bad_sampling_settings(checkpoint, capsys):
    code = main(["generate", "--model", str(checkpoint), "--top-p", "0", "hi"])
    assert code == 2
    assert "top_p must be in (0, 1]" in capsys.readouterr().err


def test_bench_prints_the_table_with_every_output_token(checkpoint, capsys):
    argv = ["--num-requests", "3", "--min-input", "4", "--max-input", "9", "--min-output", "2", "--max-output", "5"]
    code = main(["bench", "--model", str(checkpoint), "--dtype", "float32", *argv, "--seed", "3"])
    assert code == 0
    out = capsys.readouterr().out
    args = argparse.Namespace(num_requests=3, min_input=4, max_input=9, min_output=2, max_output=5, seed=3)
    prompts, output_lens = make_workload(args, vocab_size=320)
    rows = dict(re.findall(r"^(\w[\w /()]*?)\s{2,}(\S+)$", out, flags=re.M))
    assert rows["requests"] == "3"
    assert rows["input tokens"] == str(sum(map(len, prompts)))
    assert rows["output tokens"] == str(sum(output_lens))
    for name in ("total time (s)", "output tok/s", "prefill tok/s", "decode tok/s"):
        assert name in rows
