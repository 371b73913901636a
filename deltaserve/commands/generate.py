"""``deltaserve generate "prompt" ...``: complete prompts offline and print the text and the speed."""

from __future__ import annotations

import argparse
import sys
import time

HELP = "complete one or more prompts with a model (default: the built-in tiny model) and print tokens/s"


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags shared by ``generate`` and ``bench`` (EngineConfig fields)."""
    parser.add_argument("--model", default=None, help="checkpoint directory (default: the built-in tiny model)")
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                        help="weights and activations dtype (auto: the checkpoint's)")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    parser.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's, capped at 4096 on the CPU, 32768 on CUDA)")
    parser.add_argument("--max-num-seqs", type=int, default=64, help="sequences in one batch")
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048, help="tokens in one step")
    parser.add_argument("--trust-remote-code", action="store_true", help="allow a checkpoint's own tokenizer code")
    parser.add_argument("-tp", "--tensor-parallel-size", type=int, default=1,
                        help="TP ranks: worker processes started here, or the processes torchrun started")
    parser.add_argument(
        "--mamba-ssm-cache-dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
        help="GDN recurrent-state dtype (default auto: the config's mamba_ssm_dtype, else float32)",
    )  # fmt: skip
    parser.add_argument(
        "--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
        help="overlap the host work of a step with the device's next step (default: on for CUDA, off on the CPU)",
    )  # fmt: skip
    parser.add_argument(
        "--speculative-config", type=_json_dict, default=None,
        help='speculative decoding as JSON, e.g. \'{"method": "ngram", "num_speculative_tokens": 3}\'',
    )  # fmt: skip


def _json_dict(text: str) -> dict:
    import json

    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object, got {text!r}")
    return value


def engine_kwargs(args: argparse.Namespace) -> dict:
    return dict(
        model=args.model,
        dtype=args.dtype,
        device=args.device,
        max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        trust_remote_code=args.trust_remote_code,
        tensor_parallel_size=args.tensor_parallel_size,
        speculative_config=args.speculative_config,
        mamba_ssm_cache_dtype=args.mamba_ssm_cache_dtype,
        async_scheduling=args.async_scheduling,
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompts", nargs="+", metavar="PROMPT", help="prompt text (one or more)")
    add_engine_arguments(parser)
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens to generate per prompt (default 32)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=-1, help="-1 or 0 = off")
    parser.add_argument("--seed", type=int, default=None, help="sampling seed (repeatable output)")
    parser.add_argument("--ignore-eos", action="store_true", help="do not stop at the end-of-sequence token")


def run(args: argparse.Namespace) -> int:
    from deltaserve import LLM, SamplingParams

    try:
        params = SamplingParams(
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            seed=args.seed,
            max_tokens=args.max_tokens,
            ignore_eos=args.ignore_eos,
        )
        llm = LLM(**engine_kwargs(args), seed=args.seed or 0)
        start = time.perf_counter()
        outputs = llm.generate(args.prompts, params, use_tqdm=False)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    elapsed = time.perf_counter() - start
    num_tokens = 0
    for output in outputs:
        completion = output.outputs[0]
        num_tokens += len(completion.token_ids)
        print(f"prompt:     {output.prompt!r}")
        print(f"completion: {completion.text!r}")
        print(f"[{len(completion.token_ids)} tokens, finish_reason={completion.finish_reason}]")
    print(f"generated {num_tokens} tokens in {elapsed:.2f} s ({num_tokens / max(elapsed, 1e-9):.1f} tok/s)")
    return 0
