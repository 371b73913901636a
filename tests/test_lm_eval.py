"""EleutherAI's lm-evaluation-harness against the server: its ``local-completions`` client with
``--batch_size 4`` and tokenized requests (its default), on local task files of a few rows.

``generate_until``, ``multiple_choice`` and ``loglikelihood_rolling`` run end to end; the harness's
loglikelihoods (from ``echo`` + ``logprobs``) equal those computed from ``LLM`` prompt logprobs.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from deltaserve import LLM, SamplingParams
from helpers_server import MODEL_NAME, make_model, serve_in_thread

GEN = [{"question": q} for q in ("The state of a", "linear attention", "Once upon a time", "two states", "hello")]
MC = [{"question": "The sky is", "choices": [" blue", " green", " loud"], "label": 0},
      {"question": "Two plus two is", "choices": [" four", " five"], "label": 0},
      {"question": "A cat says ", "choices": ["meow", "woof", "moo", "quack"], "label": 0}]
PPL = [{"text": "Linear attention keeps a fixed-size state per layer."},
       {"text": "The conv state holds the last inputs of the convolution."}]

TASKS = {
    "ds_gen": ("gen", "output_type: generate_until\ndoc_to_text: '{{question}}'\ndoc_to_target: ''\n"
               "generation_kwargs:\n  until: ['\\n']\n  max_gen_toks: 6\n  do_sample: false\n"
               "metric_list:\n  - metric: exact_match\n"),
    "ds_mc": ("mc", "output_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\n"
              "doc_to_target: '{{label}}'\nmetric_list:\n  - metric: acc\n"),
    "ds_ppl": ("ppl", "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
               "metric_list:\n  - metric: word_perplexity\n"),
}


def write_tasks(folder: Path) -> None:
    for rows, name in ((GEN, "gen"), (MC, "mc"), (PPL, "ppl")):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    for task, (data, body) in TASKS.items():
        (folder / f"{task}.yaml").write_text(f"task: {task}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
                                             f"    test: {folder / data}.jsonl\ntest_split: test\n{body}")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lm_eval")
    write_tasks(folder)
    model_dir = make_model(folder)
    with serve_in_thread(model_dir, max_model_len=128, max_num_seqs=8) as server:
        model_args = (f"base_url={server.openai_base_url}/completions,model={MODEL_NAME},tokenizer={model_dir},"
                      f"tokenizer_backend=huggingface,max_length=120")
        argv = ["lm_eval", "--model", "local-completions", "--model_args", model_args, "--tasks", ",".join(TASKS),
                "--include_path", str(folder), "--batch_size", "4", "--log_samples", "--output_path",
                str(folder / "out")]
        run_lm_eval_cli(argv)
    samples = {}
    for task in TASKS:
        (path,) = (folder / "out").rglob(f"samples_{task}_*.jsonl")
        samples[task] = [json.loads(line) for line in path.read_text().splitlines()]
    return samples, LLM(model=str(model_dir), dtype="float32", max_model_len=128)


def run_lm_eval_cli(argv: list[str]) -> None:
    """``lm_eval ...`` (its command-line entry point) in this process: the harness's imports cost
    seconds, and a second Python would pay torch's and transformers' imports once more."""
    saved_argv, saved_env = sys.argv, dict(os.environ)
    os.environ.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    sys.argv = argv
    try:
        from lm_eval.__main__ import cli_evaluate

        cli_evaluate()
    finally:
        sys.argv = saved_argv
        os.environ.clear()
        os.environ.update(saved_env)


def prompt_logprob_sum(llm: LLM, token_ids: list[int], start: int) -> float:
    """Sum of log p(token_ids[i] | token_ids[:i]) for i >= start, from ``LLM`` prompt logprobs."""
    out = llm.generate([token_ids], SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)[0]
    return sum(out.prompt_logprobs[i][token_ids[i]].logprob for i in range(start, len(token_ids)))


def encode(llm: LLM, text: str) -> list[int]:
    return llm.get_tokenizer()(text, add_special_tokens=False).input_ids


def test_multiple_choice_loglikelihoods_equal_llm_prompt_logprobs(results):
    samples, llm = results
    assert len(samples["ds_mc"]) == len(MC)
    for sample in samples["ds_mc"]:
        for args, resp in zip(sample["arguments"].values(), sample["resps"]):
            context, continuation = args["arg_0"], args["arg_1"]
            # The harness moves a context's trailing spaces into the continuation before encoding.
            spaces = len(context) - len(context.rstrip())
            if spaces:
                context, continuation = context[:-spaces], context[-spaces:] + continuation
            whole = encode(llm, context + continuation)
            expected = prompt_logprob_sum(llm, whole, len(encode(llm, context)))
            assert float(resp[0][0]) == pytest.approx(expected, abs=1e-3)


def test_rolling_loglikelihoods_equal_llm_prompt_logprobs(results):
    samples, llm = results
    tokenizer = llm.get_tokenizer()
    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    assert len(samples["ds_ppl"]) == len(PPL)
    for sample in samples["ds_ppl"]:
        # One window: the harness scores every token after its prefix token (BOS, else EOS).
        tokens = [prefix] + encode(llm, sample["doc"]["text"])
        assert float(sample["resps"][0][0]) == pytest.approx(prompt_logprob_sum(llm, tokens, 1), abs=1e-3)


def test_generate_until_equals_llm_greedy(results):
    samples, llm = results
    assert len(samples["ds_gen"]) == len(GEN)
    for sample in samples["ds_gen"]:
        ids = encode(llm, sample["doc"]["question"])
        expected = llm.generate([ids], SamplingParams(temperature=0, max_tokens=6, stop=["\n"]), use_tqdm=False)
        assert sample["resps"][0][0] == expected[0].outputs[0].text.split("\n")[0]
