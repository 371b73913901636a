"""One request's mailbox between the engine-loop thread and the event loop."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any


class RequestFailedError(RuntimeError):
    """This request alone failed inside the engine (the engine keeps serving the others)."""


@dataclass
class RequestStream:
    """One request's mailbox: the newest output (cumulative ``RequestOutput``) or an exception.

    NOTE: outputs are cumulative, so only the newest is kept: a client that does not read its
    stream costs one output's memory, not one per step (an unread ``n=16`` stream of 3,000 tokens
    once held every intermediate copy). An exception or a finished output is never replaced.
    Timestamps are ``time.monotonic()`` seconds; the loop thread fills the timing fields.
    """

    request_id: str
    loop: asyncio.AbstractEventLoop
    arrival_time: float = field(default_factory=time.monotonic)
    first_token_time: float | None = None
    last_token_time: float | None = None
    num_generated_tokens: int = 0
    finished: bool = False
    _latest: Any = None
    _ready: asyncio.Event = field(default_factory=asyncio.Event)

    def put_threadsafe(self, item: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self._put, item)
        except RuntimeError:
            pass  # the event loop is closed: nobody is waiting any more

    def _put(self, item: Any) -> None:
        latest = self._latest
        if isinstance(latest, BaseException) or getattr(latest, "finished", False):
            return
        self._latest = item
        self._ready.set()

    async def next(self) -> Any:
        """The newest output or exception not yet taken (waits for one)."""
        await self._ready.wait()
        self._ready.clear()
        item, self._latest = self._latest, None
        return item
