"""One MoE layer's routed experts at Kimi-Linear dims: the Triton expert GEMMs for few pairs against
``torch._grouped_mm``, and both against the memory floor (the chosen experts' weights read once, over
the copy bandwidth measured in the same run). Each call replays a CUDA graph with L2 flushed before it.

    python benchmarks/bench_moe.py [--tokens 1 4 16 64] [--experts 32 256] [--sweep]

``--sweep`` times the Triton path's tile configurations (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages)
at a few token counts, to pick the fixed ones in ``deltaserve/ops/gpu/moe_gemm.py``.
"""

from __future__ import annotations

import argparse

import torch
from common import copy_bandwidth, fmt_row, graphed, header, time_ms

from deltaserve.ops.gpu import moe_gemm
from deltaserve.ops.gpu.moe import FEW_PAIRS, fused_experts_few, fused_experts_grouped
from deltaserve.ops.moe import sigmoid_topk

HIDDEN, INTER, TOP_K = 2304, 1024, 8  # Kimi-Linear-48B-A3B


def make(tokens: int, experts: int, seed: int = 0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(tokens, HIDDEN, device="cuda", generator=gen).bfloat16()
    w13 = (torch.randn(experts, 2 * INTER, HIDDEN, device="cuda", generator=gen) * HIDDEN**-0.5).bfloat16()
    w2 = (torch.randn(experts, HIDDEN, INTER, device="cuda", generator=gen) * INTER**-0.5).bfloat16()
    weights, ids = sigmoid_topk(torch.randn(tokens, experts, device="cuda", generator=gen), None, TOP_K)
    return x, w13, w2, weights, ids


def floor_bytes(ids: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> int:
    """Weights of the distinct chosen experts, each read once."""
    per_expert = (w13[0].numel() + w2[0].numel()) * w13.element_size()
    return int(ids.unique().numel()) * per_expert


def timed(fn, rep: int = 100) -> float:
    return time_ms(graphed(fn), rep=rep)


def compare(token_counts: list[int], experts: int, bw: float) -> None:
    print(f"\n## {experts} experts, top-{TOP_K}, hidden {HIDDEN}, moe_intermediate {INTER} (Triton path up to "
          f"{FEW_PAIRS} pairs in the engine)")
    widths = [6, 8, 9, 10, 8, 10, 8, 8, 9]
    print(fmt_row(["tokens", "experts", "floor ms", "grouped ms", "x floor", "triton ms", "x floor", "speedup",
                   "rel diff"], widths))
    for tokens in token_counts:
        x, w13, w2, weights, ids = make(tokens, experts)
        floor_ms = floor_bytes(ids, w13, w2) / bw * 1e3
        grouped = timed(lambda: fused_experts_grouped(x, w13, w2, weights, ids))
        few = timed(lambda: fused_experts_few(x, w13, w2, weights, ids))
        a = fused_experts_grouped(x, w13, w2, weights, ids).float()
        b = fused_experts_few(x, w13, w2, weights, ids).float()
        diff = ((a - b).norm() / a.norm()).item()
        print(fmt_row([tokens, int(ids.unique().numel()), f"{floor_ms:.4f}", f"{grouped:.4f}",
                       f"{grouped / floor_ms:.2f}", f"{few:.4f}", f"{few / floor_ms:.2f}",
                       f"{grouped / few:.2f}", f"{diff:.1e}"], widths))  # fmt: skip


def sweep(token_counts: list[int], experts: int, bw: float) -> None:
    print(f"\n## tile sweep of the Triton path, {experts} experts (ms, and x floor)")
    # NOTE: up to FEW_PAIRS pairs over 32+ experts is at most 4 rows an expert (BLOCK_M 16): that block
    # gets the wide search, the larger ones a few tiles each.
    configs = [(16, bn, bk, warps, stages)
                for bn in (32, 64, 128) for bk in (128, 256) for warps, stages in ((4, 3), (8, 4))]
    configs += [(bm, bn, 128, warps, stages) for bm in (32, 64) for bn in (64, 128) for warps, stages in ((4, 3), (8, 4))]
    cases = [(t, *make(t, experts)) for t in token_counts]
    widths = [4, 4, 4, 6, 7] + [14] * len(cases)
    print(fmt_row(["BM", "BN", "BK", "warps", "stages"] + [f"{t} tokens" for t, *_ in cases], widths))
    saved_tiles, saved_block_m = dict(moe_gemm.TILES), moe_gemm.block_m
    for bm, bn, bk, warps, stages in configs:
        moe_gemm.block_m = lambda *_, bm=bm: bm
        moe_gemm.TILES[bm] = (bn, bk, warps, stages)
        cells = []
        for _, x, w13, w2, weights, ids in cases:
            try:
                ms = timed(lambda: fused_experts_few(x, w13, w2, weights, ids), rep=40)
                cells.append(f"{ms:.4f} ({ms / (floor_bytes(ids, w13, w2) / bw * 1e3):.2f})")
            except Exception as exc:  # out of shared memory for a big tile: report and go on
                cells.append(type(exc).__name__[:14])
        print(fmt_row([bm, bn, bk, warps, stages] + cells, widths), flush=True)
    moe_gemm.TILES.clear()
    moe_gemm.TILES.update(saved_tiles)
    moe_gemm.block_m = saved_block_m


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64, 128, 256, 512])
    parser.add_argument("--experts", type=int, nargs="+", default=[32, 256])
    parser.add_argument("--sweep", action="store_true")
    args = parser.parse_args()
    header("bench_moe: routed experts, Triton expert GEMMs vs torch._grouped_mm")
    bw = copy_bandwidth()
    print(f"# copy bandwidth {bw / 1e12:.2f} TB/s; tiles by BLOCK_M (BLOCK_N, BLOCK_K, warps, stages): "
          f"{moe_gemm.TILES}")
    torch.manual_seed(0)
    for experts in args.experts:
        compare(args.tokens, experts, bw)
    if args.sweep:
        sweep([1, 4, 16, 64, 256], args.experts[0], bw)


if __name__ == "__main__":
    with torch.inference_mode():
        main()
