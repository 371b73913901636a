"""Real ``deltaserve serve --role ...`` and ``deltaserve router`` processes on loopback, and their clients."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import httpx
import uvicorn

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Proc:
    name: str
    url: str
    port: int
    popen: subprocess.Popen
    log: Path

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
            self.popen.wait(30)

    def stats(self) -> dict:
        return httpx.get(f"{self.url}/disagg/stats", timeout=30).json()


def spawn(name: str, args: list[str], log_dir: Path, port: int | None = None, env: dict | None = None) -> Proc:
    port = port or free_port()
    log = log_dir / f"{name}.log"
    full_env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", **(env or {}))
    popen = subprocess.Popen([sys.executable, "-m", "deltaserve.cli", *args, "--port", str(port),
                              "--log-level", "warning"], stdout=log.open("w"), stderr=subprocess.STDOUT,
                             env=full_env, cwd=ROOT)
    return Proc(name, f"http://127.0.0.1:{port}", port, popen, log)


def serve(name: str, role: str, model: Path, log_dir: Path, env: dict | None = None, extra: list[str] = (),
          port: int | None = None) -> Proc:
    return spawn(name, ["serve", "--role", role, "--model", str(model), "--dtype", "float32",
                        "--served-model-name", "tiny", *extra], log_dir, port=port, env=env)


def router(name: str, prefill: list[Proc], decode: list[Proc], log_dir: Path, port: int | None = None) -> Proc:
    args = ["router", "--health-interval", "0.5"]
    for p in prefill:
        args += ["--prefill", p.url]
    for d in decode:
        args += ["--decode", d.url]
    return spawn(name, args, log_dir, port=port)


def wait_ready(procs: list[Proc], timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    for proc in procs:
        while True:
            if proc.popen.poll() is not None:
                raise RuntimeError(f"{proc.name} exited ({proc.popen.returncode}): {proc.log.read_text()[-2000:]}")
            try:
                if httpx.get(f"{proc.url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{proc.name} did not start: {proc.log.read_text()[-2000:]}")
            time.sleep(0.2)


def complete(url: str, body: dict, chat: bool = False, timeout: float = 120.0) -> tuple[int, dict | str]:
    """One request, streamed or not: ``(status, result)``; a stream gives ``{"text", "finish_reason", "error"}``."""
    path = "/v1/chat/completions" if chat else "/v1/completions"
    if not body.get("stream"):
        r = httpx.post(f"{url}{path}", json=body, timeout=timeout)
        return r.status_code, r.json()
    text, finish, error = [], None, None
    with httpx.stream("POST", f"{url}{path}", json=body, timeout=timeout) as r:
        if r.status_code != 200:
            r.read()
            return r.status_code, r.json()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                error = event["error"]
                continue
            for choice in event.get("choices", []):
                piece = choice.get("text") if not chat else (choice.get("delta") or {}).get("content")
                text.append(piece or "")
                finish = choice.get("finish_reason") or finish
    return 200, {"text": "".join(text), "finish_reason": finish, "error": error}


def answer(result: dict, chat: bool = False) -> tuple[str, str | None]:
    """``(text, finish_reason)`` of a non-streamed or streamed result."""
    if "choices" in result:
        choice = result["choices"][0]
        return (choice["message"]["content"] if chat else choice["text"]), choice["finish_reason"]
    return result["text"], result["finish_reason"]


def assert_nothing_held(proc: Proc, timeout: float = 30.0) -> dict:
    """Nothing runs, waits, is held for a peer or reserved; every used slot and block is the prefix cache's."""
    deadline = time.monotonic() + timeout
    while True:
        s = proc.stats()
        idle = (s["num_running"] == 0 and s["num_waiting"] == 0 and s["kv_transfer_held_requests"] == 0
                and s["kv_transfer_reserved_requests"] == 0)
        # NOTE: *_used count running sequences; *_cached all else in use (checkpoints, holds, reservations).
        if idle and s["state_slots_used"] == s["kv_blocks_used"] == 0 \
                and s["state_slots_cached"] == s["prefix_cache_checkpoints"] \
                and s["kv_blocks_cached"] == s["prefix_cache_blocks_held"]:
            return s
        if time.monotonic() > deadline:
            raise AssertionError(f"{proc.name} still holds something: {s}")
        time.sleep(0.1)


@contextlib.contextmanager
def serve_app_in_thread(app) -> Iterator[str]:
    """Any ASGI app on a free loopback port in a daemon thread; yields its URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()
