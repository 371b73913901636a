"""Three decode-step ops against the compositions they replaced, and against the memory floor (their
bytes read and written once, over the copy bandwidth measured in the same run). Each call replays a
CUDA graph with L2 flushed before it.

- greedy sampling over ``[rows, 163840]`` float32 logits: ``greedy_sample`` (one pass) against
  ``argmax`` + ``log_softmax`` + ``gather``;
- router logits at hidden 2304: ``router_logits`` (one bf16 GEMM writing float32) against the float32
  GEMM of ``x.float()`` with a float32 copy of the weight kept aside;
- KDA's gates at 32 heads x 128: ``kda_gates`` (one launch, ``b`` a column view) against fla's
  ``kda_gate_fwd`` plus ``sigmoid(b.float())``.

    python benchmarks/bench_decode_ops.py [--rows 1 16 64 256]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from common import copy_bandwidth, fmt_row, graphed, header, time_ms

from deltaserve.ops.kda import kda_gates
from deltaserve.ops.moe import router_logits
from deltaserve.ops.sampling import greedy_sample

VOCAB, HIDDEN, HEADS, HEAD_DIM = 163840, 2304, 32, 128
WIDTHS = [6, 10, 9, 11, 8, 9, 8, 8]


def table(title: str) -> None:
    print(f"\n## {title}")
    print(fmt_row(["rows", "floor ms", "old ms", "x floor", "new ms", "x floor", "speedup", "same"], WIDTHS))


def row(rows: int, floor_bytes: int, bw: float, old, new, same: bool) -> None:
    floor = floor_bytes / bw * 1e3
    old_ms, new_ms = time_ms(graphed(old)), time_ms(graphed(new))
    print(fmt_row([rows, f"{floor:.4f}", f"{old_ms:.4f}", f"{old_ms / floor:.2f}", f"{new_ms:.4f}",
                   f"{new_ms / floor:.2f}", f"{old_ms / new_ms:.2f}", "yes" if same else "NO"], WIDTHS))  # fmt: skip


def sampling(rows_list: list[int], bw: float) -> None:
    table(f"greedy token + logprob over [rows, {VOCAB}] float32 (old: argmax + log_softmax + gather)")
    for rows in rows_list:
        logits = torch.randn(rows, VOCAB, device="cuda") * 4

        def old():
            ids = logits.argmax(dim=-1)
            return ids, torch.log_softmax(logits, dim=-1).gather(1, ids[:, None])[:, 0]

        (a_ids, a_lp), (b_ids, b_lp) = old(), greedy_sample(logits)
        same = torch.equal(a_ids, b_ids) and torch.allclose(a_lp, b_lp, atol=1e-5)
        row(rows, logits.numel() * 4, bw, old, lambda: greedy_sample(logits), same)


def router(rows_list: list[int], bw: float) -> None:
    for experts in (32, 256):
        table(f"router logits, {experts} experts x hidden {HIDDEN} bf16 -> float32 (old: float32 GEMM of x.float())")
        weight = (torch.randn(experts, HIDDEN, device="cuda") * 0.02).bfloat16()
        weight_f32 = weight.float()
        for rows in rows_list:
            x = torch.randn(rows, HIDDEN, device="cuda").bfloat16()
            old = lambda: F.linear(x.float(), weight_f32)  # noqa: E731
            a, b = old(), router_logits(x, weight)
            same = (a - b).abs().max().item() <= 1e-4 * a.abs().max().item()
            floor = weight.numel() * 2 + x.numel() * 2 + rows * experts * 4
            row(rows, floor, bw, old, lambda: router_logits(x, weight), same)


def gates(rows_list: list[int], bw: float) -> None:
    from fla.ops.kda.gate import kda_gate_fwd

    width = HEADS * HEAD_DIM
    table(f"KDA gates, {HEADS} heads x {HEAD_DIM} (old: fla kda_gate_fwd + sigmoid(b.float()))")
    A_log = torch.rand(HEADS, device="cuda").add(1).log()
    dt_bias = torch.randn(width, device="cuda") * 0.1
    for rows in rows_list:
        f = torch.randn(rows, width, device="cuda").bfloat16()
        b = torch.randn(rows, width + HEADS, device="cuda").bfloat16()[:, width:]  # a column view

        def old():
            g = kda_gate_fwd(f.view(rows, HEADS, HEAD_DIM), A_log, dt_bias, output_dtype=torch.float32)
            return g, torch.sigmoid(b.float())

        (g0, b0), (g1, b1) = old(), kda_gates(f, b, A_log, dt_bias)
        same = torch.allclose(g0, g1, rtol=1e-5, atol=1e-6) and torch.allclose(b0, b1, atol=1e-6)
        floor = f.numel() * 2 + rows * HEADS * 2 + rows * (width + HEADS) * 4 + width * 4
        row(rows, floor, bw, old, lambda: kda_gates(f, b, A_log, dt_bias), same)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, nargs="+", default=[1, 16, 64, 256])
    args = p.parse_args()
    header("bench_decode_ops: greedy sampling, router logits, KDA gates")
    bw = copy_bandwidth()
    print(f"# copy bandwidth {bw / 1e12:.2f} TB/s")
    torch.manual_seed(0)
    sampling(args.rows, bw)
    router(args.rows, bw)
    gates(args.rows, bw)


if __name__ == "__main__":
    main()
