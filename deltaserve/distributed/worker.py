"""A TP rank other than 0: its model shard and caches, run on the steps rank 0 broadcasts.

The loop receives one message per step (:class:`deltaserve.engine.model_runner.StepInputs`: replay
the cache writes, run the forward; the logits are rank 0's to sample) or a :class:`Call` (run a
runner method or a function of the runner, send the result to rank 0) or :data:`STOP`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import sys
import traceback
from dataclasses import dataclass
from typing import Any, Callable

import torch

from deltaserve.config import EngineConfig
from deltaserve.distributed.message_queue import BroadcastChannel, gather_to_first
from deltaserve.distributed.parallel_state import init_distributed, tp_layout

STOP = "stop"


@dataclass(frozen=True)
class Call:
    """Run ``method`` (a ModelRunner method name, or a picklable ``fn(runner, *args)``) on every rank."""

    method: str | Callable
    args: tuple = ()


def call_on(runner, call: Call) -> Any:
    if callable(call.method):
        return call.method(runner, *call.args)
    return getattr(runner, call.method)(*call.args)


def rank_config(config: EngineConfig) -> EngineConfig:
    """``config`` with this process's CUDA device (``init_distributed`` chose it)."""
    if torch.device(config.device).type == "cuda":
        return dataclasses.replace(config, device=f"cuda:{torch.cuda.current_device()}")
    return config


def build_runner(
    config: EngineConfig, hf_config=None, generator: torch.Generator | None = None, eos_token_ids=None, step_sender=None
):
    """This rank's model shard (read from the checkpoint's slices) and its runner."""
    from deltaserve.engine.model_runner import ModelRunner
    from deltaserve.models.loader import load_model, load_model_config

    hf_config = hf_config if hf_config is not None else load_model_config(config.model)
    # NOTE: a TP-1 engine builds unsharded layers even in a process that is in a TP group.
    single = tp_layout(0, 1) if config.tensor_parallel_size == 1 else contextlib.nullcontext()
    with single:
        model = load_model(config.model, dtype=config.dtype, device=config.device)
    return ModelRunner(config, model, hf_config, generator, eos_token_ids, step_sender=step_sender)


def run_worker(config: EngineConfig) -> None:
    """Serve rank 0's messages until :data:`STOP` (the process group is already initialised)."""
    from deltaserve.engine.model_runner import StepInputs

    runner = build_runner(rank_config(config))
    channel = BroadcastChannel()
    while True:
        message = channel.recv()
        if isinstance(message, StepInputs):
            runner.cache_ops.replay(message.cache_ops)
            runner.execute(message)
        elif isinstance(message, Call):
            gather_to_first(call_on(runner, message))
        elif message == STOP:
            return
        else:
            raise RuntimeError(f"unknown message from rank 0: {type(message).__name__}")


def worker_main(rank: int, world_size: int, config: EngineConfig, init_method: str, timeout_s: float) -> None:
    """Entry point of a spawned worker process."""
    # NOTE: Ctrl-C reaches the whole process group; only rank 0 acts on it (it stops the workers).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        init_distributed(rank, world_size, device=config.device, init_method=init_method, timeout_s=timeout_s)
        run_worker(config)
    except Exception:
        print(f"deltaserve tensor-parallel worker rank {rank} failed:", file=sys.stderr)
        traceback.print_exc()
        sys.exit(1)
    # NOTE: nothing is left to clean up; skipping the interpreter's teardown (seconds with torch
    # loaded) lets the engine's shutdown return at once.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
