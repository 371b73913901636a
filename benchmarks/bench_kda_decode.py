"""One KDA layer's decode step at Kimi-Linear-48B dims: conv update + gate + recurrent + gated norm.

Reports the recurrent state's bytes read + written per second over the device copy bandwidth
(the decode step is memory bound on that state: 2 MiB per request per layer), eager and in a CUDA
graph, against fla's ``fused_recurrent_kda_fwd`` alone (slot-indexed, in place, V-first) as baseline.

    python benchmarks/bench_kda_decode.py [--batch 1 16 64 256]
"""

from __future__ import annotations

import argparse

import torch
from common import copy_bandwidth, fmt_row, graphed, header, time_ms

from deltaserve.ops.conv1d import causal_conv1d_update
from deltaserve.ops.gpu import conv1d as _gpu_conv1d, kda as _gpu_kda, norm as _gpu_norm  # noqa: F401 (fail loudly)
from deltaserve.ops.gpu import delta_rule as gpu_delta_rule
from deltaserve.ops.gpu.kda_decode import kda_decode_step
from deltaserve.ops.kda import fused_recurrent_kda, kda_gate
from deltaserve.ops.norm import gated_rms_norm

H, D, HIDDEN, KERNEL = 32, 128, 2304, 4  # Kimi-Linear-48B-A3B
CONV_DIM = 3 * H * D


def make_layer(batch: int, device: str = "cuda"):
    """Pools with ``batch`` used slots (random states) and one step's inputs, all random."""
    slots = batch + 1
    rec = 0.05 * torch.randn(slots, H, D, D, device=device)
    conv = torch.randn(slots, KERNEL - 1, CONV_DIM, device=device, dtype=torch.bfloat16)
    index = torch.randperm(batch, device=device).to(torch.int32) + 1
    proj = torch.randn(batch, CONV_DIM, device=device, dtype=torch.bfloat16)  # q|k|v before the conv
    f = torch.randn(batch, H * D, device=device, dtype=torch.bfloat16)  # f_b_proj output
    beta = torch.rand(batch, H, device=device, dtype=torch.bfloat16)
    gate = torch.randn(batch, H * D, device=device, dtype=torch.bfloat16)  # g_b_proj output
    params = dict(
        conv_w=torch.randn(CONV_DIM, KERNEL, device=device, dtype=torch.bfloat16) / 2,
        A_log=torch.empty(H, device=device).uniform_(1, 16).log(),
        dt_bias=torch.randn(H * D, device=device) - 4,
        norm_w=torch.ones(D, device=device),
    )
    return rec, conv, index, proj, f, beta, gate, params


def decode_step(rec, conv, index, proj, f, beta, gate, p):
    x = causal_conv1d_update(proj, p["conv_w"], conv, index)  # [B, 3HD], SiLU applied
    q, k, v = (x[:, i * H * D : (i + 1) * H * D].view(-1, H, D) for i in range(3))
    g = kda_gate(f, p["A_log"], p["dt_bias"])
    o = fused_recurrent_kda(q, k, v, g, beta, rec, index)
    return gated_rms_norm(o, gate.view(-1, H, D), p["norm_w"], 1e-5)


def fused_step(rec, conv, index, proj, f, beta, gate, p, block_v=16, num_warps=2):
    return kda_decode_step(proj, p["conv_w"], conv, f, beta, gate, rec, index, p["A_log"], p["dt_bias"], p["norm_w"],
                           1e-5, num_heads=H, block_v=block_v, num_warps=num_warps)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16, 64, 256])
    parser.add_argument("--no-pieces", action="store_true", help="skip timing the step's other ops alone")
    args = parser.parse_args()
    header("KDA decode step, one layer, H=32 D=128 (Kimi-Linear-48B)")
    bw = copy_bandwidth()
    print(f"# device copy bandwidth (read+write): {bw / 1e9:.0f} GB/s")
    cols = ["batch", "variant", "eager us", "eager x bw", "graph us", "graph x bw"]
    widths = [5, 46, 9, 10, 9, 10]
    print(fmt_row(cols, widths))
    torch.manual_seed(0)
    for batch in args.batch:
        rec, conv, index, proj, f, beta, gate, p = make_layer(batch)
        state_bytes = 2 * batch * H * D * D * 4
        x = causal_conv1d_update(proj, p["conv_w"], conv.clone(), index)
        q, k, v = (x[:, i * H * D : (i + 1) * H * D].view(-1, H, D).contiguous() for i in range(3))
        g = kda_gate(f, p["A_log"], p["dt_bias"])
        o = gpu_delta_rule.fused_recurrent_delta_rule(q, k, v, g, beta, rec.clone(), index)
        variants = {"step: 4 ops (conv,gate,recurrent,norm)": lambda: decode_step(rec, conv, index, proj, f, beta, gate, p)}
        for bv, warps in ((16, 2), (16, 4), (16, 1), (8, 1)):
            variants[f"step: kda_decode_step (1 kernel, BV={bv}, {warps}w)"] = (
                lambda bv=bv, warps=warps: fused_step(rec, conv, index, proj, f, beta, gate, p, bv, warps))
        variants["recurrent alone (ours, default config)"] = (
            lambda: gpu_delta_rule.fused_recurrent_delta_rule(q, k, v, g, beta, rec, index))
        for bv, warps in ((32, 8), (16, 4), (16, 2), (32, 4), (4, 1), (2, 1), (8, 2)):
            variants[f"recurrent alone (ours, BV={bv}, {warps}w)"] = (
                lambda bv=bv, warps=warps: gpu_delta_rule.fused_recurrent_delta_rule(q, k, v, g, beta, rec, index, block_v=bv,
                                                                       num_warps=warps))
        if not args.no_pieces:
            variants["  piece: conv update"] = lambda: causal_conv1d_update(proj, p["conv_w"], conv, index)
            variants["  piece: kda_gate"] = lambda: kda_gate(f, p["A_log"], p["dt_bias"])
            variants["  piece: gated_rms_norm (fla)"] = lambda: gated_rms_norm(o, gate.view(-1, H, D), p["norm_w"], 1e-5)
        variants["recurrent alone (fla fwd, baseline)"] = lambda: gpu_delta_rule.fla_fused_recurrent_kda_fwd(
            q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1), g.unsqueeze(1), beta.unsqueeze(1),
            initial_state=rec, inplace_final_state=True, state_v_first=True, ssm_state_indices=index,
            use_qk_l2norm_in_kernel=True)
        # The ceiling for this many bytes: a plain device copy of the batch's state (read + write).
        src = torch.empty(batch * H * D * D, device="cuda")
        dst = torch.empty_like(src)
        variants["baseline: device copy of the same state bytes"] = lambda: dst.copy_(src)
        for name, fn in variants.items():
            fn()
            eager = time_ms(fn)
            graph = time_ms(graphed(fn))
            print(fmt_row([batch, name, f"{eager * 1e3:.1f}", f"{state_bytes / (eager * 1e-3) / bw:.2f}",
                           f"{graph * 1e3:.1f}", f"{state_bytes / (graph * 1e-3) / bw:.2f}"], widths), flush=True)
        del rec, conv
        torch.cuda.empty_cache()
    print(f"# x bw = recurrent state bytes read+written ({2 * H * D * D * 4 / 2**20:.0f} MiB/request) / time / copy bw;"
          f" floor at batch B = B * {2 * H * D * D * 4 / bw * 1e6:.2f} us")


if __name__ == "__main__":
    main()
