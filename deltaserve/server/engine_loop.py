"""The engine's step loop in one background thread, and the asyncio side that talks to it.

The engine is not thread-safe, so only the loop thread touches it. HTTP handlers (on the asyncio
event loop) send commands through a thread-safe queue; the thread hands each request's outputs back
with ``loop.call_soon_threadsafe`` into that request's ``RequestStream`` (which keeps the newest).
New requests are added between two steps, so they join the running batch as they arrive and no
request waits for another.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from typing import Any, Callable

from deltaserve.server.metrics import ServerMetrics
from deltaserve.server.request_stream import RequestFailedError, RequestStream  # noqa: F401 - re-exported

logger = logging.getLogger(__name__)


class EngineStoppedError(RuntimeError):
    """The loop thread stopped (server shutdown or an engine failure) before the request finished."""


def _resolve(
    loop: asyncio.AbstractEventLoop, future: asyncio.Future, result: Any = None, error: BaseException | None = None
) -> None:
    def settle() -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    try:
        loop.call_soon_threadsafe(settle)
    except RuntimeError:
        pass


class EngineLoop:
    """Owns the engine and the one thread that steps it.

    ``add_request`` / ``call`` are awaited from the event loop; ``abort`` and ``shutdown`` may be
    called from any thread (a signal handler included): they only enqueue a command.
    """

    def __init__(self, engine: Any, metrics: ServerMetrics | None = None,
                 on_failure: Callable[[BaseException], None] | None = None):
        """``on_failure(exc)`` runs on the loop thread after an engine failure, once every open stream
        got its error (``deltaserve serve`` then exits with a non-zero status)."""
        self.engine = engine
        self.on_failure = on_failure
        self.metrics = metrics if metrics is not None else ServerMetrics()
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        # NOTE: touched by the loop thread only.
        self._streams: dict[str, RequestStream] = {}
        self._thread = threading.Thread(target=self._run, name="deltaserve-engine-loop", daemon=True)
        self.error: BaseException | None = None
        # NOTE: `stopping` is set under the lock, so no command is queued after the final drain;
        # `shutdown()` only sets `_shutdown_requested` (no lock: it may run in a signal handler).
        self._lock = threading.Lock()
        self.stopping = False
        self._shutdown_requested = False

    # ---- called from the event loop / any thread -------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    @property
    def is_alive(self) -> bool:
        return self._thread.is_alive() and not (self.stopping or self._shutdown_requested)

    def _put(self, command: tuple) -> bool:
        with self._lock:
            if self.stopping:
                return False
            self._commands.put(command)
            return True

    async def add_request(self, stream: RequestStream, prompt: str | list[int], params: Any) -> None:
        """Add a request between two steps; raises the engine's ``ValueError`` on a bad request.

        Outputs then arrive through ``stream.next()``; an ``EngineStoppedError`` ends them early.
        """
        added = stream.loop.create_future()
        if not self.is_alive or not self._put(("add", stream, prompt, params, added)):
            raise EngineStoppedError("the engine is not running")
        try:
            await added
        except asyncio.CancelledError:
            # NOTE: the client left while the add was queued; the abort follows the add in the queue.
            self.abort(stream.request_id)
            raise

    async def call(self, fn: Callable[[Any], Any]) -> Any:
        """Run ``fn(engine)`` on the loop thread between two steps (consistent engine counters)."""
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        if not self._put(("call", fn, loop, done)):
            return fn(self.engine)  # nothing steps it any more
        return await done

    def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))

    def shutdown(self, reason: str = "the server is shutting down") -> None:
        """Stop the loop: running requests are aborted and their streams get ``EngineStoppedError``."""
        self._shutdown_requested = True
        self._commands.put(("shutdown", reason))

    def join(self, timeout: float | None = None) -> None:
        if self._thread.is_alive():
            self._thread.join(timeout)

    # ---- the loop thread -------------------------------------------------------------------------

    def _run(self) -> None:
        reason = "the server is shutting down"
        try:
            while True:
                idle = not self.engine.has_unfinished_requests()
                stop = self._handle_commands(block=idle)
                if stop is not None:
                    reason = stop
                    break
                if self.engine.has_unfinished_requests():
                    outputs = self.engine.step()
                    self._fail_requests(self.engine.pop_request_errors())
                    self._dispatch(outputs, time.monotonic())
        except BaseException as exc:  # noqa: BLE001 - reported to every waiting request
            # NOTE: an error no request can be blamed for: the engine's state is unknown, so it
            # stops for good (every open stream gets the error) and the process should end.
            logger.exception("engine loop failed")
            self.error = exc
            reason = f"engine failure: {type(exc).__name__}: {exc}"
        finally:
            with self._lock:
                self.stopping = True
            self._fail_all(reason)
            if self.error is not None and self.on_failure is not None:
                self.on_failure(self.error)

    def _handle_commands(self, block: bool) -> str | None:
        """Apply queued commands; block for the first one when idle. Returns a stop reason or None."""
        try:
            command = self._commands.get(timeout=0.5) if block else self._commands.get_nowait()
        except queue.Empty:
            return None
        while True:
            kind = command[0]
            if kind == "add":
                self._add(*command[1:])
            elif kind == "abort":
                self._abort(command[1])
            elif kind == "call":
                fn, loop, done = command[1:]
                try:
                    _resolve(loop, done, result=fn(self.engine))
                except Exception as exc:  # noqa: BLE001 - handed back to the caller
                    _resolve(loop, done, error=exc)
            elif kind == "shutdown":
                return command[1]
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return None

    def _add(self, stream: RequestStream, prompt: Any, params: Any, added: asyncio.Future) -> None:
        try:
            self.engine.add_request(stream.request_id, prompt, params)
        except Exception as exc:  # noqa: BLE001 - ValueError names the bad field; handed back as is
            _resolve(stream.loop, added, error=exc)
            return
        self._streams[stream.request_id] = stream
        _resolve(stream.loop, added)

    def _abort(self, request_id: str) -> None:
        stream = self._streams.pop(request_id, None)
        if stream is None:
            return  # already finished
        self.engine.abort_request(request_id)
        self.metrics.on_finished(stream, "abort", time.monotonic())

    def _fail_requests(self, errors: dict[str, BaseException]) -> None:
        """Requests the engine failed one by one (already aborted there): their streams get the error."""
        for request_id, exc in errors.items():
            stream = self._streams.pop(request_id, None)
            if stream is not None:
                self.metrics.on_finished(stream, "abort", time.monotonic())
                stream.put_threadsafe(RequestFailedError(f"the request failed in the engine: {type(exc).__name__}: "
                                                         f"{exc}"))

    def _dispatch(self, outputs: list[Any], now: float) -> None:
        for output in outputs:
            stream = self._streams.get(output.request_id)
            if stream is None:
                continue  # aborted by its client after the step started
            num_tokens = sum(len(completion.token_ids) for completion in output.outputs)
            self.metrics.on_tokens(stream, num_tokens - stream.num_generated_tokens, now)
            stream.num_generated_tokens = num_tokens
            if output.finished:
                del self._streams[output.request_id]
                reasons = [c.finish_reason for c in output.outputs]
                self.metrics.on_finished(stream, reasons[0] if reasons else None, now, len(output.prompt_token_ids))
            stream.put_threadsafe(output)

    def _fail_all(self, reason: str) -> None:
        for request_id, stream in list(self._streams.items()):
            try:
                self.engine.abort_request(request_id)
            except Exception:  # noqa: BLE001 - the engine may be the thing that failed
                logger.exception("abort of %s failed", request_id)
            stream.put_threadsafe(EngineStoppedError(reason))
        self._streams.clear()
        # NOTE: commands that arrived after the stop still wait on futures: settle them all.
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                break
            if command[0] == "add":
                stream, added = command[1], command[4]
                _resolve(stream.loop, added, error=EngineStoppedError(reason))
            elif command[0] == "call":
                _resolve(command[2], command[3], error=EngineStoppedError(reason))
