"""TP rank 0's side of a tensor-parallel engine: start the workers, send each step, watch them.

``tensor_parallel_size = N`` starts ``N - 1`` worker processes (torch.multiprocessing spawn) that
join rank 0 in one process group over TCP on this host; under ``torchrun`` (several hosts) every
process is started by torchrun, and ranks other than 0 become workers inside the engine's
constructor. A watchdog thread notices a worker that exits; rank 0 then aborts its communicators,
so that no collective waits on a dead peer, and the engine raises :class:`WorkerDiedError`.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import threading
import time
from multiprocessing.connection import wait
from typing import Any, Callable

import torch.multiprocessing as mp

from deltaserve.config import EngineConfig
from deltaserve.distributed import parallel_state
from deltaserve.distributed.message_queue import BroadcastChannel, gather_to_first
from deltaserve.distributed.worker import STOP, Call, call_on, run_worker, worker_main

STARTUP_POLL_S = 0.2
SHUTDOWN_WAIT_S = 10.0


class WorkerDiedError(RuntimeError):
    """A tensor-parallel worker exited; the engine cannot continue."""


def launched_by_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and "WORLD_SIZE" in os.environ)


def start_executor(config: EngineConfig, hf_config) -> "TensorParallelExecutor | None":
    """None at TP 1; else check that TP divides the model, then start the group (rank 0 returns)."""
    if config.tensor_parallel_size == 1:
        return None
    check_model_shards(hf_config, config.tensor_parallel_size)
    return TensorParallelExecutor(config)


def check_model_shards(hf_config, tp_size: int) -> None:
    """Build the model of ``hf_config`` as rank 0 of ``tp_size`` on the meta device (no memory, no
    processes), so that a size TP does not divide is a ValueError naming it before any worker starts."""
    import torch

    from deltaserve.models.registry import resolve

    with parallel_state.tp_layout(0, tp_size), torch.device("meta"):
        resolve(hf_config)(hf_config, torch.float32)


def rank_devices(device: str, world_size: int) -> list[str]:
    """The device of each spawned rank: the CPU for all, or ``cuda:<first + rank>``; ValueError if this
    host has too few GPUs."""
    import torch

    parsed = torch.device(device)
    if parsed.type != "cuda":
        return [device] * world_size
    first = parsed.index or 0
    count = torch.cuda.device_count()
    if first + world_size > count:
        raise ValueError(
            f"tensor_parallel_size = {world_size} needs CUDA devices {first}..{first + world_size - 1}; "
            f"this machine has {count} (use torchrun to span several hosts)"
        )
    return [f"cuda:{first + rank}" for rank in range(world_size)]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class TensorParallelExecutor:
    """Rank 0's handle on the TP group: ``send_step``, ``collective_rpc``, ``check``, ``shutdown``."""

    def __init__(self, config: EngineConfig, timeout_s: float = parallel_state.DEFAULT_TIMEOUT_S):
        self.world_size = config.tensor_parallel_size
        self.procs: list[mp.Process] = []
        self.failure: str | None = None
        self._stopping = False
        if launched_by_torchrun():
            world = int(os.environ["WORLD_SIZE"])
            if world != self.world_size:
                raise ValueError(f"torchrun started {world} processes but tensor_parallel_size = {self.world_size}")
            rank = int(os.environ["RANK"])
            parallel_state.init_distributed(rank, world, device=config.device, timeout_s=timeout_s)
            if rank != 0:
                # NOTE: a worker rank never returns from the engine's constructor.
                run_worker(config)
                parallel_state.destroy_distributed()
                raise SystemExit(0)
        else:
            devices = rank_devices(config.device, self.world_size)
            init_method = f"tcp://127.0.0.1:{_free_port()}"
            ctx = mp.get_context("spawn")
            for rank in range(1, self.world_size):
                rank_config = dataclasses.replace(config, device=devices[rank])
                proc = ctx.Process(
                    target=worker_main,
                    args=(rank, self.world_size, rank_config, init_method, timeout_s),
                    name=f"deltaserve-tp-rank{rank}",
                    daemon=True,
                )
                proc.start()
                self.procs.append(proc)
            self._join_group(dataclasses.replace(config, device=devices[0]), init_method, timeout_s)
            threading.Thread(target=self._watch, name="deltaserve-tp-watchdog", daemon=True).start()
        self.channel = BroadcastChannel()

    def _join_group(self, config: EngineConfig, init_method: str, timeout_s: float) -> None:
        """Rank 0's rendezvous, failing at once (not at the timeout) if a worker exits meanwhile."""
        errors: list[BaseException] = []

        def join() -> None:
            try:
                parallel_state.init_distributed(
                    0, self.world_size, device=config.device, init_method=init_method, timeout_s=timeout_s
                )
            except BaseException as exc:  # handed to the main thread
                errors.append(exc)

        thread = threading.Thread(target=join, name="deltaserve-tp-rendezvous", daemon=True)
        thread.start()
        while thread.is_alive():
            thread.join(STARTUP_POLL_S)
            if self._dead():
                self.shutdown()
                raise WorkerDiedError(f"{self._describe_dead()} while the tensor-parallel group was starting")
        if errors:
            self.shutdown()
            raise errors[0]

    # ---- health ------------------------------------------------------------------------------

    def _dead(self) -> list[mp.Process]:
        return [p for p in self.procs if p.exitcode is not None]

    def _describe_dead(self) -> str:
        dead = self._dead()
        return ", ".join(
            f"tensor-parallel worker rank {self.procs.index(p) + 1} (pid {p.pid}) exited with code {p.exitcode}"
            for p in dead
        )

    def _watch(self) -> None:
        while not self._stopping:
            ready = wait([p.sentinel for p in self.procs], timeout=1.0)
            if ready and not self._stopping:
                for proc in self.procs:
                    if proc.sentinel in ready:
                        proc.join(1.0)  # NOTE: the sentinel fires before the exit code can be read
                self.failure = f"{self._describe_dead()}; the engine cannot continue"
                # NOTE: unblocks a collective of rank 0 that waits on the dead worker (NCCL would wait
                # for its timeout; gloo usually sees the closed connection by itself).
                parallel_state.abort_distributed()
                return

    def check(self, cause: BaseException | None = None) -> None:
        """Raise :class:`WorkerDiedError` if a worker has died (``cause``: the error rank 0 saw, if any)."""
        if self.failure is None and isinstance(cause, RuntimeError) and self.procs:
            # NOTE: a collective can fail a moment before the dead process is reaped.
            deadline = time.monotonic() + 5.0
            while not self._dead() and time.monotonic() < deadline:
                time.sleep(0.05)
            if self._dead():
                self.failure = f"{self._describe_dead()}; the engine cannot continue"
        if self.failure is not None:
            raise WorkerDiedError(self.failure) from cause

    # ---- messages ----------------------------------------------------------------------------

    def send_step(self, inputs) -> None:
        """One broadcast: the step's inputs (``StepInputs``) to every worker."""
        self.check()
        self.channel.send(inputs)

    def collective_rpc(self, method: str | Callable, *args) -> list[Any]:
        """Run a runner method (or ``fn(runner, *args)``) on the workers; their results, ranks 1..N-1."""
        self.check()
        call = Call(method, args)
        self.channel.send(call)
        # NOTE: rank 0's own result is the caller's to compute; it sends None here.
        return gather_to_first(None)[1:]

    def shutdown(self) -> None:
        """Stop the workers (asked, then terminated if they do not exit) and leave the process group."""
        if self._stopping:
            return
        self._stopping = True
        healthy = self.failure is None and not self._dead() and parallel_state.get_tp_group().world_size > 1
        if healthy and hasattr(self, "channel"):
            try:
                self.channel.send(STOP)
            except Exception:
                healthy = False
        for proc in self.procs:
            proc.join(SHUTDOWN_WAIT_S if healthy else 0.5)
            if proc.exitcode is None:
                proc.terminate()
                proc.join(SHUTDOWN_WAIT_S)
        if healthy:
            parallel_state.destroy_distributed()
        else:
            parallel_state.abort_distributed()
            parallel_state.reset_tp_group()


__all__ = ["TensorParallelExecutor", "WorkerDiedError", "launched_by_torchrun", "call_on"]
