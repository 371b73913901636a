"""ASGI middleware of the server: a request-body size limit (413) and the API key (401).

Both answer in OpenAI's error shape before the app reads a body or runs a handler.
"""

from __future__ import annotations

import hmac
import json
from typing import Any

# NOTE: a few MB of text is far beyond any context deltaserve serves; larger bodies are refused
# before they are read into memory (and before JSON parsing and tokenization cost time).
DEFAULT_MAX_BODY_BYTES = 8 << 20


async def _send_error(send: Any, status: int, message: str, type_: str, code: str, headers: list | None = None) -> None:
    body = json.dumps({"error": {"message": message, "type": type_, "param": None, "code": code}}).encode()
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())] + (headers or [])})
    await send({"type": "http.response.body", "body": body})


class BodySizeLimit:
    """413 for a body over ``max_bytes``: by its Content-Length at once, or as soon as a streamed
    (chunked) body passes the limit."""

    def __init__(self, app: Any, max_bytes: int = DEFAULT_MAX_BODY_BYTES):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        message = f"the request body exceeds {self.max_bytes} bytes"
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            return await _send_error(send, 413, message, "invalid_request_error", "request_too_large")
        received = 0
        state = {"started": False, "rejected": False}

        async def limited_receive() -> dict:
            nonlocal received
            event = await receive()
            if event["type"] == "http.request":
                received += len(event.get("body", b""))
                if received > self.max_bytes:
                    # NOTE: answered here (the app would turn a raised error into a 400), then the app
                    # sees a disconnect and whatever it sends is dropped.
                    if not state["started"]:
                        state["started"] = True
                        await _send_error(send, 413, message, "invalid_request_error", "request_too_large")
                    state["rejected"] = True
                    return {"type": "http.disconnect"}
            return event

        async def tracking_send(event: dict) -> None:
            if state["rejected"]:
                return
            state["started"] = state["started"] or event["type"] == "http.response.start"
            await send(event)

        await self.app(scope, limited_receive, tracking_send)


class ApiKeyAuth:
    """With a key set, every ``/v1`` route needs ``Authorization: Bearer <key>`` (else OpenAI's 401);
    ``/health``, ``/metrics``, ``/version`` and the tokenizer routes stay open, as in vLLM."""

    def __init__(self, app: Any, api_key: str):
        self.app, self.api_key = app, api_key.encode()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1") or scope.get("method") == "OPTIONS":
            return await self.app(scope, receive, send)
        header = dict(scope.get("headers") or []).get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.api_key):
            return await _send_error(send, 401, "Incorrect API key provided: send 'Authorization: Bearer <key>'",
                                     "invalid_request_error", "invalid_api_key",
                                     [(b"www-authenticate", b"Bearer")])
        await self.app(scope, receive, send)
