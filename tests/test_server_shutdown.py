"""``deltaserve serve`` as a process: SIGTERM / SIGINT end open streams with an error event and exit."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from helpers_server import make_model


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("server_shutdown"))


def _start(model_dir, port: int) -> subprocess.Popen:
    command = [sys.executable, "-m", "deltaserve.cli", "serve", "--model", str(model_dir), "--port", str(port),
               "--max-model-len", "2048", "--dtype", "float32", "--log-level", "warning"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"deltaserve serve exited early:\n{process.stdout.read()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return process
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    process.kill()
    raise AssertionError("deltaserve serve did not come up")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_ends_open_streams_with_an_error_and_exits(model_dir, sig):
    port = _free_port()
    process = _start(model_dir, port)
    try:
        body = {"prompt": "a", "max_tokens": 2000, "stream": True, "ignore_eos": True}
        events = []
        with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=30) as response:
            lines = response.iter_lines()
            for line in lines:
                if line.startswith("data: "):
                    events.append(line[len("data: "):])
                if len(events) == 2:
                    break
            sent_at = time.monotonic()
            process.send_signal(sig)
            for line in lines:
                if line.startswith("data: "):
                    events.append(line[len("data: "):])
        assert events[-1] == "[DONE]"
        error = json.loads(events[-2])["error"]
        assert "shutting down" in error["message"]
        # NOTE: uvicorn re-raises the signal it handled once it has shut down: SIGTERM then ends the
        # process (-SIGTERM), SIGINT's KeyboardInterrupt is caught by the command (0).
        returncode = process.wait(timeout=20)
        assert time.monotonic() - sent_at < 20
        output = process.stdout.read()
        assert returncode in (0, -sig), output
        assert "Traceback" not in output, output
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
