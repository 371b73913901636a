"""Shared timing helpers for the kernel benchmarks: device copy bandwidth, median timings, CUDA graphs."""

from __future__ import annotations

import datetime
import platform
from typing import Callable

import torch
import triton
from triton.testing import do_bench


def header(title: str) -> None:
    """Print what ran where: card, software versions, date."""
    props = torch.cuda.get_device_properties(0)
    print(f"# {title}")
    print(
        f"# card: {props.name} ({props.multi_processor_count} SMs, {props.total_memory / 2**30:.0f} GiB); "
        f"torch {torch.__version__}, triton {triton.__version__}, python {platform.python_version()}; "
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC"
    )


def time_ms(fn: Callable[[], object], rep: int = 200) -> float:
    """Median milliseconds of one call, L2 flushed before each (triton's do_bench)."""
    return do_bench(fn, warmup=25, rep=rep, return_mode="median")


def copy_bandwidth(gib: float = 1.0) -> float:
    """Device copy bandwidth in bytes/s: ``dst.copy_(src)`` of ``gib`` GiB, bytes read + written over time."""
    src = torch.randn(int(gib * 2**30) // 4, device="cuda")
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), rep=200)
    del src, dst
    return 2 * gib * 2**30 / (ms * 1e-3)


def graphed(fn: Callable[[], object]) -> Callable[[], None]:
    """Capture ``fn`` (already warmed up: no autotuning or allocation left) into a CUDA graph; returns replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    torch.cuda.synchronize()
    return graph.replay


def fmt_row(cells: list, widths: list[int]) -> str:
    return " | ".join(str(c).rjust(w) for c, w in zip(cells, widths))
