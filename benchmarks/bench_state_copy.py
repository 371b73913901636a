"""Copy both states of N requests across 20 KDA layers (Kimi-Linear-48B dims): fused vs torch vs four-state.

- fused: ``deltaserve.ops.gpu.state_copy.copy_slots`` (one Triton launch per pool tensor), and the public
  ``deltaserve.state.copy.copy_slots`` that validates slot ids first (host syncs) and then calls it;
- torch: ``index_copy_(index_select)`` per pool tensor (what the CPU path does);
- four-state: conv_q, conv_k, conv_v and recurrent as separate per-layer tensors, a Python loop over layers;
- floor: bytes read + written at the device copy bandwidth.

    python benchmarks/bench_state_copy.py [--pairs 1 64]
"""

from __future__ import annotations

import argparse

import torch
from common import copy_bandwidth, fmt_row, header, time_ms

from deltaserve.ops.gpu import state_copy as gpu_copy
from deltaserve.state import copy as state_copy
from deltaserve.state.layout import kda_layout
from deltaserve.state.pool import StateGroup, StatePool

LAYERS, H, D = 20, 32, 128


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pairs", type=int, nargs="+", default=[1, 64])
    args = parser.parse_args()
    header(f"state copy, {LAYERS} KDA layers, H={H} D={D}, bf16 conv + fp32 recurrent")
    bw = copy_bandwidth()
    print(f"# device copy bandwidth (read+write): {bw / 1e9:.0f} GB/s")
    layout = kda_layout(H, D, model_dtype=torch.bfloat16)
    per_slot = layout.bytes_per_slot * LAYERS
    print(f"# per request: {per_slot / 2**20:.1f} MiB over {LAYERS} layers "
          f"(conv {layout.conv_bytes / 2**10:.0f} KiB + recurrent {layout.recurrent_bytes / 2**20:.0f} MiB per layer)")
    widths = [5, 40, 9, 8]
    print(fmt_row(["pairs", "variant", "us", "x floor"], widths))
    torch.manual_seed(0)
    for pairs in args.pairs:
        num_slots = 2 * pairs
        pool = StatePool({"kda": StateGroup(layout, LAYERS)}, num_slots, device="cuda")
        pool.conv["kda"].normal_()
        pool.recurrent["kda"].normal_()
        perm = torch.randperm(num_slots, device="cuda") + 1
        src, dst = perm[:pairs].contiguous(), perm[pairs:].contiguous()
        src_list, dst_list = src.tolist(), dst.tolist()
        floor_ms = 2 * pairs * per_slot / bw * 1e3
        # four-state: per layer, conv_q / conv_k / conv_v [slots+1, K-1, H*D] and recurrent [slots+1, H, V, K]
        legacy = [
            [torch.randn(num_slots + 1, *shape, device="cuda").to(dtype) for shape, dtype in
             (((3, H * D), torch.bfloat16),) * 3 + (((H, D, D), torch.float32),)]
            for _ in range(LAYERS)
        ]

        def four_state():
            for tensors in legacy:
                for t in tensors:
                    t[dst] = t[src]

        def torch_index():
            for t in (pool.conv["kda"], pool.recurrent["kda"]):
                t.index_copy_(1, dst, t.index_select(1, src))

        variants = {
            "fused Triton (ops.gpu.state_copy)": lambda: gpu_copy.copy_slots(pool, src, dst),
            "public copy_slots (checks + fused)": lambda: state_copy.copy_slots(pool, src_list, dst_list),
            "torch index_select/index_copy_": torch_index,
            "four-state, loop over layers": four_state,
        }
        print(fmt_row([pairs, "floor (bytes / copy bw)", f"{floor_ms * 1e3:.1f}", "1.00"], widths))
        for name, fn in variants.items():
            ms = time_ms(fn)
            print(fmt_row([pairs, name, f"{ms * 1e3:.1f}", f"{ms / floor_ms:.2f}"], widths), flush=True)
        expected = pool.recurrent["kda"][:, src]
        gpu_copy.copy_slots(pool, src, dst)
        assert torch.equal(pool.recurrent["kda"][:, dst], expected)
        del pool, legacy, expected
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
