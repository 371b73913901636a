"""The real HTTP server in a background thread, on a free loopback port, and a /metrics reader."""

from __future__ import annotations

import contextlib
import re
import socket
import threading
import time
from pathlib import Path
from typing import Iterator, NamedTuple

import httpx
import uvicorn

from deltaserve.config import EngineConfig
from deltaserve.engine.llm_engine import LLMEngine
from deltaserve.models.tiny import make_tiny
from deltaserve.server.app import create_app

MODEL_NAME = "tiny"


class RunningServer(NamedTuple):
    url: str  # http://127.0.0.1:PORT
    model_dir: Path
    engine: LLMEngine

    @property
    def openai_base_url(self) -> str:
        return f"{self.url}/v1"


def make_model(tmp_dir: Path) -> Path:
    """The tiny checkpoint in float32, written fresh into ``tmp_dir``."""
    return make_tiny(Path(tmp_dir) / "tiny", seed=0)


@contextlib.contextmanager
def serve_in_thread(model_dir: Path, max_queue: int = 256, app_kwargs: dict | None = None, api_key: str | None = None,
                    tool_call_parser: str | None = None, **engine_kwargs) -> Iterator[RunningServer]:
    """uvicorn serving ``create_app`` in a daemon thread; stopped (and checked stopped) on exit."""
    engine = LLMEngine(EngineConfig(model=str(model_dir), dtype="float32", **engine_kwargs))
    app = create_app(engine, served_model_name=MODEL_NAME, max_queue=max_queue, api_key=api_key,
                     tool_call_parser=tool_call_parser, **(app_kwargs or {}))
    # NOTE: the socket is bound here and handed to uvicorn, so no other process can take the port.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=10))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield RunningServer(f"http://127.0.0.1:{sock.getsockname()[1]}", Path(model_dir), engine)
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()
        assert not thread.is_alive(), "the server thread did not stop"
        assert not app.state.engine_loop._thread.is_alive(), "the engine loop thread did not stop"


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)$")


def read_metrics(url: str) -> dict[str, float]:
    """``GET /metrics`` as ``{name or name{labels without model_name}: value}``."""
    text = httpx.get(f"{url}/metrics", timeout=30).text
    samples = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE.match(line)
        assert match, f"not a Prometheus sample line: {line!r}"
        name, labels, value = match.groups()
        labels = ",".join(p for p in (labels or "{}")[1:-1].split(",") if p and not p.startswith("model_name="))
        samples[f"{name}{{{labels}}}" if labels else name] = float(value)
    return samples


def wait_until_idle(url: str, timeout: float) -> dict[str, float]:
    """Poll /metrics until nothing runs or waits; returns the last reading."""
    deadline = time.monotonic() + timeout
    while True:
        metrics = read_metrics(url)
        if metrics["deltaserve_num_requests_running"] == 0 and metrics["deltaserve_num_requests_waiting"] == 0:
            return metrics
        if time.monotonic() > deadline:
            raise AssertionError(f"still busy after {timeout} s: {metrics}")
        time.sleep(0.05)
