"""GDN decode step (the recurrent delta rule alone) at Qwen3-Next-80B dims: Hk=16, Hv=32, Dk=Dv=128, fp32 state.

Reports the recurrent state's bytes read + written per second over the device copy bandwidth (the step
is memory bound on that state: 2 MiB per request per layer), for the project's slot-indexed in-place
Triton kernel (default block config and a sweep) against fla-core's ``fused_recurrent_gated_delta_rule``
(out of place: fla 0.6.0 has no slot indices for GDN), in the same run. Three timings per row: one call
eager, one call in a CUDA graph, and ``LAYERS`` calls on distinct per-layer pools in one CUDA graph
(what a decode step of a many-layer model pays per layer: launch latency overlaps the previous kernel).

    python benchmarks/bench_gdn_decode.py [--batch 1 16 64 256] [--layers 8]
"""

from __future__ import annotations

import argparse

import torch
from common import copy_bandwidth, fmt_row, graphed, header, time_ms

from deltaserve.ops.delta_rule import gdn_gate
from deltaserve.ops.gpu import delta_rule as gpu_delta_rule

HK, HV, D = 16, 32, 128  # Qwen3-Next-80B-A3B
SWEEP = ((2, 1), (4, 1), (4, 2), (8, 1), (8, 2), (8, 4), (16, 2), (16, 4), (32, 4), (32, 8))
SHORT_SWEEP = ((4, 1), (8, 1), (16, 2), (32, 8))


def make_step(batch: int, layers: int, device: str = "cuda"):
    """Per-layer pools with ``batch`` used slots (random states, slot 0 null) and one step's inputs."""
    pools = [0.05 * torch.randn(batch + 1, HV, D, D, device=device) for _ in range(layers)]
    index = torch.randperm(batch, device=device).to(torch.int32) + 1
    proj = torch.randn(batch, (2 * HK + HV) * D, device=device, dtype=torch.bfloat16)  # conv output q|k|v
    q, k, v = proj.split([HK * D, HK * D, HV * D], dim=-1)
    q, k, v = q.view(batch, HK, D), k.view(batch, HK, D), v.view(batch, HV, D)
    ab = torch.randn(batch, 2 * HV, device=device, dtype=torch.bfloat16)
    A_log = torch.empty(HV, device=device).uniform_(0.01, 16).log()
    g, beta = gdn_gate(ab[:, :HV], ab[:, HV:], A_log, torch.ones(HV, device=device))
    return pools, index, (q, k, v, g, beta)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16, 64, 256])
    parser.add_argument("--layers", type=int, default=8, help="calls on distinct pools in the multi-layer graph")
    parser.add_argument("--sweep", choices=["full", "short", "none"], default="short", help="block configs to time")
    args = parser.parse_args()
    header(f"GDN decode, recurrent delta rule, Hk={HK} Hv={HV} Dk=Dv={D} fp32 state (Qwen3-Next-80B)")
    bw = copy_bandwidth()
    print(f"# device copy bandwidth (read+write): {bw / 1e9:.0f} GB/s")
    cols = ["batch", "variant", "eager us", "x bw", "graph us", "x bw", f"{args.layers}L graph us/layer", "x bw"]
    widths = [5, 40, 9, 5, 9, 5, 22, 5]
    print(fmt_row(cols, widths))
    torch.manual_seed(0)
    for batch in args.batch:
        pools, index, (q, k, v, g, beta) = make_step(batch, args.layers)
        # fla's kernel reads and writes whole [B, Hv, V, K] tensors: the used slots, contiguous
        dense = [p[1:].clone() for p in pools]
        state_bytes = 2 * batch * HV * D * D * 4
        bv, warps = gpu_delta_rule.decode_config(batch, HV, D)
        sorted_index = torch.arange(1, batch + 1, device="cuda", dtype=torch.int32)
        variants = {f"ours, in place (default BV={bv}, {warps}w)": {}}
        sweep = {"full": SWEEP, "short": SHORT_SWEEP, "none": ()}[args.sweep]
        variants.update({f"ours, in place (BV={b}, {w}w)": {"block_v": b, "num_warps": w} for b, w in sweep})
        variants["ours, default, evict_first state"] = {"evict_first": True}
        variants["ours, default, launch_pdl"] = {"launch_pdl": True}
        fns = {}
        for name, options in variants.items():
            fns[name] = lambda pool, options=options: gpu_delta_rule.fused_recurrent_delta_rule(
                q, k, v, g, beta, pool, index, **options)  # fmt: skip
        fns["ours, default, slots in order (diagnostic)"] = lambda pool: gpu_delta_rule.fused_recurrent_delta_rule(
            q, k, v, g, beta, pool, sorted_index)  # fmt: skip
        # one destination per layer, so that no layer's writes land on lines another layer left in L2
        copy_dst = {id(d): torch.empty_like(d) for d in dense}
        fns["floor: torch copy of the same bytes"] = lambda state: copy_dst[id(state)].copy_(state)
        # NOTE: fla needs contiguous [B, 1, H, *] inputs: made here, outside the timing (ours reads the views)
        fla_inputs = [t.contiguous().unsqueeze(1) for t in (q, k, v, g, beta)]

        def fla_step(state, inputs=fla_inputs):
            return gpu_delta_rule.fla_fused_recurrent_gated_delta_rule(
                *inputs[:4], beta=inputs[4], initial_state=state, output_final_state=True,
                use_qk_l2norm_in_kernel=True, state_v_first=True)  # fmt: skip

        fns["fla fused_recurrent_gated_delta_rule (out of place)"] = fla_step
        for name, fn in fns.items():
            states = dense if name.startswith(("fla", "floor")) else pools
            one = lambda fn=fn, s=states[0]: fn(s)  # noqa: E731
            many = lambda fn=fn, states=states: [fn(s) for s in states]  # noqa: E731
            one()
            eager = time_ms(one)
            graph = time_ms(graphed(one))
            layered = time_ms(graphed(many)) / len(states)
            print(fmt_row([batch, name, f"{eager * 1e3:.1f}", f"{state_bytes / (eager * 1e-3) / bw:.2f}",
                           f"{graph * 1e3:.1f}", f"{state_bytes / (graph * 1e-3) / bw:.2f}",
                           f"{layered * 1e3:.1f}", f"{state_bytes / (layered * 1e-3) / bw:.2f}"], widths), flush=True)
        del pools, dense
        torch.cuda.empty_cache()
    print(f"# x bw = recurrent state bytes read+written ({2 * HV * D * D * 4 / 2**20:.0f} MiB/request) / time / copy bw;"
          f" floor at batch B = B * {2 * HV * D * D * 4 / bw * 1e6:.2f} us")


if __name__ == "__main__":
    main()
