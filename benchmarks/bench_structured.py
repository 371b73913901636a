"""Cost of structured outputs: decode tok/s of grammar-constrained against unconstrained requests.

A fixed batch of ``--batch`` requests is prefilled, then ``--steps`` decode steps are timed (each
step's wall time: scheduling, forward, bitmask fill on the CPU, masked sampling, outputs). Rows:
no constraint (the baseline of the same run), every row constrained by a small EBNF grammar
(lower-case text), every row by a JSON schema, and half of the rows by the JSON schema. Requests
use ``ignore_eos`` and grammars that cannot end within the timed steps, so the batch stays full
(the last column checks it).

The model is ``make_kimi_shaped``'s (48B dimensions, 32 experts, random bf16 weights) with a
byte-level tokenizer of the model's vocabulary size: the 256 bytes plus random word pieces (letters,
digits, JSON punctuation, half with a leading space), so that the grammar's mask is computed over a
vocabulary as large as Kimi's (``--tokenizer bytes``: the 259 tokens of the tiny checkpoint, tokens
past them never allowed). ``--tiny``: the built-in tiny checkpoint.

    python benchmarks/bench_structured.py                      # Kimi-shaped, one GPU
    python benchmarks/bench_structured.py --tiny --device cpu  # dry runs
    python benchmarks/bench_structured.py --small --device cpu --batch 4 --steps 8
"""

from __future__ import annotations

import argparse
import datetime
import json
import random
import statistics
import string
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from deltaserve import LLM, SamplingParams  # noqa: E402
from deltaserve.models.tiny import make_tokenizer  # noqa: E402

# NOTE: neither grammar can end within the timed steps (the EBNF never does, the array needs 1000
# items), so no row finishes early and the batch stays full.
GRAMMAR = "root ::= [a-z ,.] root"
SCHEMA = {"type": "object", "properties": {"rows": {"type": "array", "minItems": 1000, "items": {
    "type": "object", "properties": {"id": {"type": "integer"}, "name": {"type": "string"}, "ok": {"type": "boolean"}},
    "required": ["id", "name", "ok"]}}}, "required": ["rows"]}


def build(args) -> LLM:
    common = dict(device=args.device, max_model_len=args.prompt_len + args.steps + 64, max_num_seqs=args.batch,
                  enable_prefix_caching=False)
    if args.tiny:
        return LLM(dtype="float32" if args.device == "cpu" else "bfloat16", **common)
    import make_kimi_shaped

    overrides = make_kimi_shaped.SMALL_OVERRIDES if args.small else None
    config_dir = make_kimi_shaped.write_config(Path(tempfile.mkdtemp()) / "kimi-shaped", args.num_experts, overrides)
    vocab_size = json.loads((config_dir / "config.json").read_text())["vocab_size"]
    tokenizer = make_tokenizer() if args.tokenizer == "bytes" else word_piece_tokenizer(vocab_size)
    tokenizer.save_pretrained(str(config_dir))
    print(f"tokenizer: {len(tokenizer)} tokens ({args.tokenizer}), model vocab {vocab_size}")
    model = make_kimi_shaped.make_model(config_dir, torch.bfloat16, args.device)
    from deltaserve.models import loader

    original, loader.load_model = loader.load_model, lambda *a, **k: model
    try:
        return LLM(model=str(config_dir), dtype="bfloat16", max_num_batched_tokens=args.batch * args.prompt_len,
                   **common)
    finally:
        loader.load_model = original


def word_piece_tokenizer(vocab_size: int, seed: int = 0):
    """Byte-level BPE (no merges: only the ids matter here) with random word pieces up to ``vocab_size``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from deltaserve.models.tiny_tokenizer import SPECIAL_TOKENS, _bytes_to_unicode

    vocab = {char: byte for byte, char in _bytes_to_unicode().items()}
    rng = random.Random(seed)
    alphabet = string.ascii_letters + string.digits + '_.,:;"{}[]-'
    # NOTE: "Ġ" is the byte-level stand-in for a space.
    while len(vocab) < vocab_size - len(SPECIAL_TOKENS):
        piece = ("Ġ" if rng.random() < 0.5 else "") + "".join(rng.choices(alphabet, k=rng.randint(2, 8)))
        vocab.setdefault(piece, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    bos, eos, pad = SPECIAL_TOKENS
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=pad)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def decode_steps(llm: LLM, constraints: list, args) -> tuple[list[float], int, int]:
    """Step times of ``args.steps`` decode steps at a full batch; (times, rows still running, tokens)."""
    engine = llm.llm_engine
    for i, constraint in enumerate(constraints):
        params = SamplingParams(temperature=1.0, seed=i, max_tokens=args.steps + 8, ignore_eos=True,
                                structured_outputs=constraint)
        engine.add_request(f"r{i}", [(31 * i + 7 * j) % 200 + 32 for j in range(args.prompt_len)], params)
    while engine.scheduler.waiting or any(s.is_prefill for s in engine.scheduler.running):
        engine.step()
    times, tokens = [], 0
    for _ in range(args.steps):
        sync()
        t0 = time.perf_counter()
        batch_size = engine.num_running
        engine.step()
        sync()
        times.append(time.perf_counter() - t0)
        tokens += batch_size
    running = engine.num_running
    for i in range(len(constraints)):
        engine.abort_request(f"r{i}")
    return times, running, tokens


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--num-experts", type=int, default=32)
    p.add_argument("--tiny", action="store_true", help="the built-in tiny checkpoint instead of the Kimi-shaped one")
    p.add_argument("--device", default="cuda")
    p.add_argument("--tokenizer", choices=("word-pieces", "bytes"), default="word-pieces")
    p.add_argument("--small", action="store_true", help="make_kimi_shaped's small dimensions (a CPU dry run)")
    args = p.parse_args()
    card = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu"
    import xgrammar

    print(f"# bench_structured: {card}; torch {torch.__version__}, xgrammar {getattr(xgrammar, '__version__', '?')}; "
          f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
    print(f"# command: {' '.join(sys.argv)}")
    llm = build(args)
    text, schema = {"grammar": GRAMMAR}, {"json": SCHEMA}
    half = args.batch // 2
    cases = [("unconstrained", [None] * args.batch), ("text grammar, all rows", [text] * args.batch),
             ("json schema, all rows", [schema] * args.batch),
             ("json schema, half the rows", [schema] * half + [None] * (args.batch - half))]
    decode_steps(llm, [schema] * min(args.batch, 4) + [None] * min(args.batch, 4), argparse.Namespace(**{
        **vars(args), "steps": 4}))  # warm-up: kernels, the grammar cache, xgrammar's mask kernel
    rows, base = [], None
    for name, constraints in cases:
        times, running, tokens = decode_steps(llm, constraints, args)
        median = statistics.median(times)
        tok_s = tokens / sum(times)
        base = base or tok_s
        rows.append((name, f"{1e3 * median:.2f}", f"{tok_s:.0f}", f"{tok_s / base:.3f}", f"{running}/{args.batch}"))
    widths = [28, 14, 10, 12, 14]
    header = ("requests", "ms/step (med)", "tok/s", "vs uncons.", "rows at end")
    print(" | ".join(h.ljust(w) for h, w in zip(header, widths)))
    print("-|-".join("-" * w for w in widths))
    for row in rows:
        print(" | ".join(str(c).ljust(w) for c, w in zip(row, widths)))


if __name__ == "__main__":
    main()
