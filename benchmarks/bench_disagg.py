"""Prefill/decode hand-over: bytes per request (against ``deltaserve plan``), time per hand-over as a
fraction of what the link carries, and time to first token of the split system against one instance.

Starts, as processes of this machine (on one GPU they share it): a prefill and a decode instance, a
router, and a single instance (the baseline). The model has Kimi-Linear-48B's state dimensions (20 KDA
layers of 32 heads x 128, 7 MLA layers with a 512 + 64 latent) and tiny everything else, so a hand-over
moves what the 48B model's does while the forward stays cheap. Per prompt length, one request at a
time (fresh random prompts, no prefix-cache hits): the decode instance's counters give the bytes it
read and the time from the start of its NIXL READ to its completion; the link is measured in the
same run as one NIXL READ of a large contiguous buffer between two agents of this process.

    python benchmarks/bench_disagg.py                                  # CPU
    bash scripts/gpu_run.sh python benchmarks/bench_disagg.py --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from deltaserve.commands.plan import make_plan, parse_config  # noqa: E402
from deltaserve.disagg.connector import load_nixl  # noqa: E402
from deltaserve.models.tiny import make_tiny  # noqa: E402

KIMI48B_STATE = {
    "hidden_size": 128, "intermediate_size": 128, "num_hidden_layers": 27, "num_attention_heads": 32,
    "num_key_value_heads": 32, "kv_lora_rank": 512, "qk_rope_head_dim": 64, "qk_nope_head_dim": 16,
    "v_head_dim": 16, "num_experts": 4, "moe_intermediate_size": 16, "num_expert_group": 1,
    "linear_attn_config": {
        "head_dim": 128, "num_heads": 32, "short_conv_kernel_size": 4,
        "kda_layers": [1, 2, 3, 5, 6, 7, 9, 10, 11, 13, 14, 15, 17, 18, 19, 21, 22, 23, 25, 26],
        "full_attn_layers": [4, 8, 12, 16, 20, 24, 27],
    },
}


def spawn(args: list[str], log: Path, env: dict) -> tuple[subprocess.Popen, str]:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    popen = subprocess.Popen([sys.executable, "-m", "deltaserve.cli", *args, "--port", str(port),
                              "--log-level", "warning"], stdout=log.open("w"), stderr=subprocess.STDOUT, env=env,
                             cwd=REPO)
    return popen, f"http://127.0.0.1:{port}"


def wait_ready(urls: list[str], procs: list[subprocess.Popen], timeout: float = 900.0) -> None:
    deadline = time.monotonic() + timeout
    for url, proc in zip(urls, procs):
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{url} exited with {proc.returncode}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{url} did not start")
            time.sleep(0.5)


def ttft(url: str, prompt: list[int]) -> float:
    """Seconds from sending a streamed completion to its first token event."""
    body = {"prompt": prompt, "max_tokens": 2, "temperature": 0, "ignore_eos": True, "stream": True,
            "logprobs": 0}
    start = time.perf_counter()
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=600) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{url}: {r.status_code} {r.read()!r}")
        elapsed = None
        for line in r.iter_lines():
            if elapsed is None and line.startswith("data: {") and json.loads(line[6:]).get("choices"):
                elapsed = time.perf_counter() - start
    return elapsed


def link_bandwidth(device: str, num_bytes: int = 256 << 20, repeats: int = 5) -> float:
    """Bytes/s of one NIXL READ of ``num_bytes`` contiguous bytes between two agents (median of repeats)."""
    nixl_agent, nixl_agent_config = load_nixl()
    config = nixl_agent_config(enable_prog_thread=False, backends=["UCX"])
    a, b = nixl_agent("bench-a", config), nixl_agent("bench-b", config)
    src = torch.ones(num_bytes // 4, device=device)
    dst = torch.zeros_like(src)
    a.register_memory([dst])
    b.register_memory([src])
    a.add_remote_agent(b.get_agent_metadata())
    mem = "VRAM" if src.is_cuda else "DRAM"
    local = a.get_xfer_descs([(dst.data_ptr(), num_bytes, max(dst.get_device(), 0))], mem)
    remote = a.get_xfer_descs([(src.data_ptr(), num_bytes, max(src.get_device(), 0))], mem)
    times = []
    for _ in range(repeats + 1):
        handle = a.initialize_xfer("READ", local, remote, "bench-b")
        start = time.perf_counter()
        a.transfer(handle)
        while (state := a.check_xfer_state(handle)) == "PROC":
            b.get_new_notifs()  # NOTE: drives the target's progress (no progress thread, as the instances)
        assert state == "DONE", state
        times.append(time.perf_counter() - start)
        a.release_xfer_handle(handle)
    assert torch.equal(dst, src)
    return num_bytes / statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--model", default=None, help="a checkpoint dir (default: tiny with Kimi-48B state dims)")
    parser.add_argument("--prompt-lens", type=int, nargs="+", default=None)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    lens = args.prompt_lens or ([16, 64, 256] if args.device == "cpu" else [256, 2048, 8192])
    tmp = Path(tempfile.mkdtemp(prefix="bench_disagg_"))
    model = Path(args.model) if args.model else make_tiny(tmp / "model", overrides=KIMI48B_STATE)
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "4"))
    common = ["--model", str(model), "--device", args.device, "--dtype", args.dtype, "--max-num-seqs", "4",
              "--max-model-len", str(max(lens) + 64)]
    procs, urls = zip(*[spawn(["serve", *role, *common], tmp / f"{name}.log", env) for name, role in
                        (("prefill", ["--role", "prefill"]), ("decode", ["--role", "decode"]), ("single", []))])
    procs, urls = list(procs), list(urls)
    router, router_url = spawn(["router", "--prefill", urls[0], "--decode", urls[1]], tmp / "router.log", env)
    procs.append(router)
    urls.append(router_url)
    try:
        wait_ready(urls, procs)
        link = link_bandwidth(args.device)
        config = json.loads((model / "config.json").read_text())
        plan = make_plan(parse_config(config), cache_dtype=args.dtype)
        state_bytes = sum(g.num_layers * g.layout.bytes_per_slot for g in plan.linear)
        kv_per_token = sum(g.num_layers * g.bytes_per_token for g in plan.attention)
        block_size = 16
        print(f"# prefill/decode hand-over on {args.device} ({torch.cuda.get_device_name() if args.device != 'cpu' else 'CPU'}), "
              f"{args.dtype}; model: {model.name} ({plan.model_type}, Kimi-Linear-48B state dims)")
        print(f"# plan: {state_bytes:,} state bytes per request + {kv_per_token:,} KV bytes per token "
              f"(blocks of {block_size} move whole)")
        print(f"# link: one NIXL READ of 256 MiB between two agents: {link / 1e9:.2f} GB/s")
        rng = random.Random(0)
        for url in (router_url, urls[2]):  # warm-up (and the decode side's hand-shake)
            ttft(url, [rng.randrange(256) for _ in range(8)])
        print("| prompt | bytes read | bytes (plan) | READ ms | GB/s | x link | TTFT single ms | TTFT split ms |")
        print("|---:|---:|---:|---:|---:|---:|---:|---:|")
        for n in lens:
            read_s, read_b, single, split = [], [], [], []
            for _ in range(args.repeats):
                prompt = [rng.randrange(256) for _ in range(n)]
                single.append(ttft(urls[2], prompt))
                before = httpx.get(f"{urls[1]}/disagg/stats").json()
                split.append(ttft(router_url, [rng.randrange(256) for _ in range(n)]))
                after = httpx.get(f"{urls[1]}/disagg/stats").json()
                read_b.append(after["kv_transfer_load_bytes"] - before["kv_transfer_load_bytes"])
                read_s.append(after["kv_transfer_load_seconds"] - before["kv_transfer_load_seconds"])
            expected = state_bytes + -(-n // block_size) * block_size * kv_per_token
            seconds = statistics.median(read_s)
            print(f"| {n} | {read_b[0]:,} | {expected:,}{'' if read_b[0] == expected else ' (differs!)'} | "
                  f"{seconds * 1e3:.2f} | {read_b[0] / seconds / 1e9:.2f} | {read_b[0] / seconds / link:.2f} | "
                  f"{statistics.median(single) * 1e3:.1f} | {statistics.median(split) * 1e3:.1f} |")
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(30)


if __name__ == "__main__":
    main()
