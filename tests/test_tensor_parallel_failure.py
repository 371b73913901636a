"""A tensor-parallel engine whose worker dies fails with an error naming the worker, without hanging;
a model TP does not divide is refused before any worker starts."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from deltaserve import LLM, SamplingParams
from deltaserve.distributed.executor import WorkerDiedError
from helpers_tp import make_tp_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_tp_checkpoint(tmp_path_factory.mktemp("tp-failure"))


def test_a_worker_killed_mid_generation_fails_the_engine_with_a_clear_error(checkpoint):
    llm = LLM(str(checkpoint), tensor_parallel_size=2, max_num_seqs=4, num_kv_blocks=256)
    try:
        params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
        assert len(llm.generate([[1, 2, 3]], params, use_tqdm=False)[0].outputs[0].token_ids) == 4
        worker = llm.llm_engine.executor.procs[0]
        killed_at = []

        def kill() -> None:
            killed_at.append(time.monotonic())
            os.kill(worker.pid, signal.SIGKILL)

        timer = threading.Timer(0.5, kill)
        timer.start()
        long = SamplingParams(temperature=0.0, max_tokens=900, ignore_eos=True)
        with pytest.raises(WorkerDiedError, match=rf"worker rank 1 \(pid {worker.pid}\) exited with code -9"):
            llm.generate([[5, 6, 7, 8]] * 4, long, use_tqdm=False)
        timer.join()
        assert killed_at and time.monotonic() - killed_at[0] < 20.0  # not the 300 s collective timeout
        # The engine stays failed, with the same error, and shuts down.
        with pytest.raises(WorkerDiedError, match="the engine cannot continue"):
            llm.generate([[1, 2]], params, use_tqdm=False)
    finally:
        llm.shutdown()


def test_heads_that_tp_does_not_divide_are_refused_before_workers_start(checkpoint):
    with pytest.raises(ValueError, match=r"KDA num_heads \(linear_attn_config.num_heads\) = 4 is not divisible by tp_size = 3"):
        LLM(str(checkpoint), tensor_parallel_size=3)


@pytest.mark.parametrize("value", [0, -2, 1.5, True])
def test_tensor_parallel_size_must_be_a_positive_integer(value):
    with pytest.raises(ValueError, match="tensor_parallel_size must be a positive integer"):
        LLM(tensor_parallel_size=value)


def test_mtp_drafts_with_tensor_parallel_are_refused_before_workers_start(checkpoint):
    mtp = {"method": "mtp", "num_speculative_tokens": 1}
    with pytest.raises(ValueError, match=r"method 'mtp' is not supported with tensor_parallel_size > 1 \(got 2\)"):
        LLM(str(checkpoint), tensor_parallel_size=2, speculative_config=mtp)
    from deltaserve.config import EngineConfig

    assert EngineConfig(speculative_config=mtp).speculative_config.method == "mtp"  # TP 1: allowed


def test_cli_takes_tensor_parallel_size_and_reports_a_bad_one(checkpoint, capsys):
    from deltaserve.cli import main

    assert main(["generate", "hi", "--model", str(checkpoint), "--tensor-parallel-size", "3"]) == 2
    assert "is not divisible by tp_size = 3" in capsys.readouterr().err
