"""KDA prefill throughput at Kimi-Linear-48B dims (H=32, D=128), 8k tokens per batch.

Our ``chunk_kda`` op (gathers initial states from the slot pool, fla-core's ``chunk_kda``, scatters the
final states back) vs fla's ``chunk_kda`` alone on ready-made initial states; and our Triton varlen
conv1d on the same batch (q|k|v, 12288 channels), with its bytes / copy bandwidth.

    python benchmarks/bench_kda_prefill.py
"""

from __future__ import annotations

import torch
from common import copy_bandwidth, fmt_row, header, time_ms

from deltaserve.ops.conv1d import causal_conv1d_fn
from deltaserve.ops.gpu import conv1d as _gpu_conv1d, delta_rule as gpu_delta_rule, norm as _gpu_norm  # noqa: F401
from deltaserve.ops.kda import chunk_kda, kda_gate

H, D, KERNEL = 32, 128, 4
CONFIGS = [(1, 8192), (8, 1024)]


def gather_scatter(pool, index, init):
    """What the op adds around fla: gather the initial states, zero the fresh ones, scatter the finals."""
    states = pool.index_select(0, index.long())
    states.masked_fill_(~init.view(-1, 1, 1, 1), 0.0)
    pool.index_copy_(0, index.long(), states)


def main() -> None:
    header("KDA prefill, one layer, H=32 D=128 (Kimi-Linear-48B), bf16")
    bw = copy_bandwidth()
    print(f"# device copy bandwidth (read+write): {bw / 1e9:.0f} GB/s")
    widths = [8, 38, 9, 12, 8]
    print(fmt_row(["batch", "variant", "ms", "tokens/s", "x bw"], widths))
    torch.manual_seed(0)
    for num_seqs, length in CONFIGS:
        tokens = num_seqs * length
        dev = "cuda"
        proj = torch.randn(tokens, 3 * H * D, device=dev, dtype=torch.bfloat16)
        q, k, v = (proj[:, i * H * D : (i + 1) * H * D].view(tokens, H, D) for i in range(3))
        A_log = torch.empty(H, device=dev).uniform_(1, 16).log()
        g = kda_gate(torch.randn(tokens, H * D, device=dev, dtype=torch.bfloat16), A_log,
                     torch.randn(H * D, device=dev) - 4)
        beta = torch.rand(tokens, H, device=dev, dtype=torch.bfloat16)
        pool = 0.05 * torch.randn(num_seqs + 1, H, D, D, device=dev)
        conv_pool = torch.randn(num_seqs + 1, KERNEL - 1, 3 * H * D, device=dev, dtype=torch.bfloat16)
        conv_w = torch.randn(3 * H * D, KERNEL, device=dev, dtype=torch.bfloat16)
        cu = torch.arange(0, tokens + 1, length, device=dev, dtype=torch.int32)
        index = torch.arange(1, num_seqs + 1, device=dev, dtype=torch.int32)
        init = torch.ones(num_seqs, device=dev, dtype=torch.bool)
        h0 = pool[1:].clone()
        cu_long = cu.long()
        qc, kc, vc = (t.contiguous() for t in (q, k, v))
        gc, bc = g.unsqueeze(0), beta.unsqueeze(0)

        def fla_alone():
            with torch.no_grad():
                return gpu_delta_rule.fla_chunk_kda(qc[None], kc[None], vc[None], gc, bc, initial_state=h0, output_final_state=True,
                                             use_qk_l2norm_in_kernel=True, state_v_first=True, cu_seqlens=cu_long)

        variants = {
            "chunk_kda op (gather+fla+scatter)": (lambda: chunk_kda(qc, kc, vc, g, beta, pool, cu, index, init), None),
            "fla chunk_kda alone (baseline)": (fla_alone, None),
            # fla's input_guard copies non-contiguous q/k/v (column slices of one projection)
            "chunk_kda op, strided q/k/v views": (lambda: chunk_kda(q, k, v, g, beta, pool, cu, index, init), None),
            "  gather + scatter of the states alone": (lambda: gather_scatter(pool, index, init), None),
        }
        for bt, bd, warps in ((16, 128, 4), (32, 128, 4)):
            variants[f"conv1d varlen (Triton {bt}x{bd}, {warps}w)"] = (
                lambda bt=bt, bd=bd, warps=warps: _gpu_conv1d.causal_conv1d_fn(
                    proj, conv_w, conv_pool, cu, index, init, block_t=bt, block_d=bd, num_warps=warps),
                2 * proj.numel() * proj.element_size())
        for name, (fn, nbytes) in variants.items():
            ms = time_ms(fn, rep=300)
            ratio = "" if nbytes is None else f"{nbytes / (ms * 1e-3) / bw:.2f}"
            print(fmt_row([f"{num_seqs}x{length}", name, f"{ms:.3f}", f"{tokens / (ms * 1e-3) / 1e6:.2f} M", ratio],
                          widths), flush=True)


if __name__ == "__main__":
    main()
