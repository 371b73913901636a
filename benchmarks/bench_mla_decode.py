"""One MLA layer's decode attention at Kimi-Linear dims (32 heads, latent 512 + rope 64, paged cache of
16-token blocks): the latent kernel with the key range split over several programs (flash-decoding)
against no split, and both against the floor (the cached latents and w_uk, w_uv read once, over the copy bandwidth
measured in the same run). CUDA-graph replays, L2 flushed before each.

    python benchmarks/bench_mla_decode.py [--batch 1 16 64 256] [--context 512 4096]

Rows: ``TARGET_PROGRAMS`` of ``deltaserve/ops/gpu/attention.py`` (0: never split); the split count
follows from it and the batch. ``--sweep`` times the kernel's tiles (heads per program ``BLOCK_H``,
keys per iteration ``BLOCK_N``, warps, stages) at the engine's split rule.
"""

from __future__ import annotations

import argparse

import torch
from common import copy_bandwidth, fmt_row, graphed, header, time_ms

from deltaserve.ops.gpu import attention as gpu_attention

HEADS, RANK, ROPE, NOPE, V_DIM, BLOCK = 32, 512, 64, 128, 128, 16


def make(batch: int, context: int):
    blocks_per_seq = -(-(context + 1) // BLOCK)
    cache = torch.randn(batch * blocks_per_seq + 1, BLOCK, RANK + ROPE, device="cuda").bfloat16()
    tables = (torch.randperm(batch * blocks_per_seq, device="cuda") + 1).int().view(batch, blocks_per_seq)
    q = torch.randn(batch, HEADS, NOPE + ROPE, device="cuda").bfloat16()
    w_uk = (torch.randn(HEADS, NOPE, RANK, device="cuda") * RANK**-0.5).bfloat16()
    w_uv = (torch.randn(HEADS, V_DIM, RANK, device="cuda") * RANK**-0.5).bfloat16()
    cu = torch.arange(batch + 1, device="cuda", dtype=torch.int32)
    lens = torch.full((batch,), context + 1, device="cuda", dtype=torch.int32)
    return q, cache, w_uk, w_uv, cu, lens, tables


def floor_ms(batch: int, context: int, bw: float) -> float:
    """The cached latents and the absorbed projections w_uk, w_uv, read once."""
    return (batch * (context + 1) * (RANK + ROPE) + 2 * HEADS * NOPE * RANK) * 2 / bw * 1e3


def run(case) -> float:
    q, cache, w_uk, w_uv, cu, lens, tables = case
    return time_ms(graphed(lambda: gpu_attention.paged_mla_attention(
        q, cache, w_uk, w_uv, cu_seqlens=cu, seq_lens=lens, block_tables=tables, scale=0.1)), rep=100)


def sweep(batches: list[int], context: int, bw: float) -> None:
    print(f"\n## tile sweep, context {context} (ms, and x floor)")
    cases = [(b, make(b, context)) for b in batches]
    widths = [7, 7, 5, 6] + [14] * len(cases)
    print(fmt_row(["BLOCK_H", "BLOCK_N", "warps", "stages"] + [f"batch {b}" for b, _ in cases], widths))
    saved = gpu_attention.mla_tile
    for bh in (16, 32):
        for bn in (16, 32, 64):
            for warps in (4, 8):
                for stages in (2, 3):
                    gpu_attention.mla_tile = lambda _, tile=(bh, bn, warps, stages): tile
                    cells = []
                    for batch, case in cases:
                        try:
                            ms = run(case)
                            cells.append(f"{ms:.4f} ({ms / floor_ms(batch, context, bw):.1f}x)")
                        except Exception as exc:  # out of shared memory for a big tile: report and go on
                            cells.append(type(exc).__name__[:14])
                    print(fmt_row([bh, bn, warps, stages] + cells, widths), flush=True)
    gpu_attention.mla_tile = saved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16, 64, 256])
    parser.add_argument("--context", type=int, nargs="+", default=[512, 4096])
    parser.add_argument("--targets", type=int, nargs="+", default=[0, 132, 264, 528, 1056])
    parser.add_argument("--sweep", action="store_true")
    args = parser.parse_args()
    header("bench_mla_decode: paged MLA decode attention, split key ranges")
    bw = copy_bandwidth()
    print(f"# copy bandwidth {bw / 1e12:.2f} TB/s; engine TARGET_PROGRAMS {gpu_attention.TARGET_PROGRAMS}")
    widths = [6, 8, 9] + [16] * len(args.targets)
    print(fmt_row(["batch", "context", "floor ms"] + [f"target {t}" for t in args.targets], widths))
    saved = gpu_attention.TARGET_PROGRAMS
    for context in args.context:
        for batch in args.batch:
            case = make(batch, context)
            floor = floor_ms(batch, context, bw)
            cells = []
            for target in args.targets:
                gpu_attention.TARGET_PROGRAMS = target
                splits = gpu_attention.num_splits(batch, -(-HEADS // gpu_attention.mla_tile(batch)[0]))
                ms = run(case)
                cells.append(f"{ms:.4f} s{splits} ({ms / floor:.1f}x)")
            print(fmt_row([batch, context, f"{floor:.4f}"] + cells, widths))
    gpu_attention.TARGET_PROGRAMS = saved
    if args.sweep:
        sweep(args.batch, args.context[0], bw)


if __name__ == "__main__":
    with torch.inference_mode():
        main()
