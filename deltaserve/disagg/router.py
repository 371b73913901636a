"""The router: OpenAI routes in front of prefill and decode instances.

A request goes to a prefill instance (``/disagg/prefill``: the prompt, its first token, the states
and KV blocks held there), then, with the ``kv_transfer_params`` that returned, to a decode
instance, whose answer (streamed or not) is passed through. Failure rules (docs/disaggregation.md):

- a prefill instance that cannot be reached is marked down and the request tries the next one;
- a decode instance that cannot be reached is marked down and the next one gets the same
  ``kv_transfer_params`` (nothing was read yet, the prefill side still holds it all);
- an instance that fails once it has the request: a clear error to the client (502, or an error
  event in a stream) naming the instance, and the prefill side is told to drop what it holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any, AsyncIterator

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from deltaserve.disagg.peers import Instance, InstancePool
from deltaserve.server.responses import sse
from deltaserve.server.serving import RequestError

logger = logging.getLogger(__name__)

HEALTH_INTERVAL_S = 1.0
TIMEOUT = httpx.Timeout(connect=5.0, read=600.0, write=30.0, pool=None)


def _error(message: str, status: int = 502, code: str = "peer_failed", param: str | None = None) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse(RequestError(message, param, status=status, type=kind, code=code).body(), status_code=status)


def create_router_app(prefill_urls: list[str], decode_urls: list[str],
                      health_interval_s: float = HEALTH_INTERVAL_S) -> FastAPI:
    prefills, decodes = InstancePool("prefill", prefill_urls), InstancePool("decode", decode_urls)
    counters = {"requests": 0, "errors": 0, "retries": 0}
    state: dict[str, Any] = {}

    async def health_loop() -> None:
        while True:
            await asyncio.gather(prefills.check(state["client"]), decodes.check(state["client"]))
            await asyncio.sleep(health_interval_s)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        async with httpx.AsyncClient(timeout=TIMEOUT, trust_env=False,
                                     limits=httpx.Limits(max_connections=None, max_keepalive_connections=64)) as c:
            state["client"] = c
            await asyncio.gather(prefills.check(c), decodes.check(c))
            task = asyncio.create_task(health_loop())
            try:
                yield
            finally:
                task.cancel()

    app = FastAPI(title="deltaserve router", lifespan=lifespan)
    app.state.pools = (prefills, decodes)

    async def prefill(endpoint: str, body: dict) -> tuple[dict | None, Response | None]:
        tried: set[str] = set()
        while (instance := prefills.pick(tried)) is not None:
            tried.add(instance.url)
            instance.in_flight += 1
            instance.num_requests += 1
            try:
                r = await state["client"].post(f"{instance.url}/disagg/prefill", json={"endpoint": endpoint, "body": body})
            except httpx.TransportError as exc:
                instance.mark_down(exc)
                instance.num_failures += 1
                counters["retries"] += 1
                continue  # NOTE: nothing of the request is left on an instance that failed
            finally:
                instance.in_flight -= 1
            if r.status_code != 200:
                return None, Response(r.content, r.status_code, media_type="application/json")
            params = r.json()["kv_transfer_params"]
            params["remote_url"] = instance.url
            return params, None
        return None, _error(f"no healthy prefill instance (tried {sorted(tried) or 'none'}; "
                            f"{[i['url'] + ': ' + str(i['last_error']) for i in prefills.describe()]})",
                            503, "no_prefill_instance")

    async def release(params: dict) -> None:
        with contextlib.suppress(httpx.HTTPError):
            await state["client"].post(f"{params['remote_url']}/disagg/release",
                                       json={"request_id": params["remote_request_id"]}, timeout=2.0)

    async def relay(instance: Instance, r: httpx.Response, params: dict) -> AsyncIterator[bytes]:
        try:
            async for chunk in r.aiter_raw():
                yield chunk
        except httpx.HTTPError as exc:
            instance.mark_down(exc)
            counters["errors"] += 1
            message = f"the decode instance {instance.url} failed mid-stream: {type(exc).__name__}: {exc}"
            yield sse(RequestError(message, status=502, type="server_error", code="decode_failed").body()).encode()
            yield sse("[DONE]").encode()
        finally:
            instance.in_flight -= 1
            await r.aclose()

    async def route(endpoint: str, path: str, request: Request) -> Response:
        counters["requests"] += 1
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            return _error(f"malformed JSON body: {exc}", 400, "json_invalid")
        if not isinstance(body, dict):
            return _error("request body: must be a JSON object", 400, "invalid_body")
        if body.get("n", 1) != 1:
            return _error(f"n: the disaggregated router serves one sequence per request (n = 1), got {body['n']!r}",
                          400, "unsupported_parameter", "n")
        for name in ("echo", "prompt_logprobs"):
            if body.get(name):
                return _error(f"{name}: needs the prompt's logits on the decode side; not supported by the "
                              f"disaggregated router", 400, "unsupported_parameter", name)
        body.pop("kv_transfer_params", None)
        params, failed = await prefill(endpoint, body)
        if failed is not None:
            counters["errors"] += failed.status_code >= 500
            return failed
        body["kv_transfer_params"] = params
        tried: set[str] = set()
        while (instance := decodes.pick(tried)) is not None:
            tried.add(instance.url)
            instance.in_flight += 1
            instance.num_requests += 1
            try:
                req = state["client"].build_request("POST", f"{instance.url}{path}", json=body)
                r = await state["client"].send(req, stream=True)
            except httpx.ConnectError as exc:
                instance.in_flight -= 1
                instance.mark_down(exc)
                counters["retries"] += 1
                continue  # NOTE: it never saw the request; the prefill side still holds everything
            except httpx.HTTPError as exc:
                instance.in_flight -= 1
                instance.mark_down(exc)
                counters["errors"] += 1
                await release(params)
                return _error(f"the decode instance {instance.url} failed: {type(exc).__name__}: {exc}", 502,
                              "decode_failed")
            if r.status_code != 200 or not body.get("stream"):
                try:
                    content = await r.aread()
                except httpx.HTTPError as exc:
                    instance.mark_down(exc)
                    counters["errors"] += 1
                    await release(params)
                    return _error(f"the decode instance {instance.url} failed mid-request: {type(exc).__name__}: "
                                  f"{exc}", 502, "decode_failed")
                finally:
                    instance.in_flight -= 1
                    await r.aclose()
                counters["errors"] += r.status_code >= 500
                return Response(content, r.status_code, media_type="application/json")
            return StreamingResponse(relay(instance, r, params), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        counters["errors"] += 1
        await release(params)
        return _error(f"no healthy decode instance (tried {sorted(tried) or 'none'})", 503, "no_decode_instance")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await route("completions", "/v1/completions", request)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await route("chat", "/v1/chat/completions", request)

    @app.get("/v1/models")
    async def models() -> Response:
        for pool in (decodes, prefills):
            for instance in pool.instances:
                if instance.healthy:
                    with contextlib.suppress(httpx.HTTPError):
                        r = await state["client"].get(f"{instance.url}/v1/models", timeout=5.0)
                        return Response(r.content, r.status_code, media_type="application/json")
        return _error("no healthy instance to ask for the model list", 503, "no_instance")

    @app.get("/health")
    async def health() -> JSONResponse:
        ok = any(i.healthy for i in prefills.instances) and any(i.healthy for i in decodes.instances)
        return JSONResponse({"status": "ok" if ok else "unavailable", "prefill": prefills.describe(),
                             "decode": decodes.describe()}, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        lines = []
        for name, value in counters.items():
            lines += [f"# TYPE deltaserve_router_{name}_total counter", f"deltaserve_router_{name}_total {value}"]
        for metric, attr in (("instance_healthy", "healthy"), ("instance_in_flight", "in_flight"),
                             ("instance_requests_total", "num_requests")):
            lines.append(f"# TYPE deltaserve_router_{metric} gauge")
            for pool in (prefills, decodes):
                for i in pool.instances:
                    lines.append(f'deltaserve_router_{metric}{{role="{i.role}",url="{i.url}"}} {int(getattr(i, attr))}')
        return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4; charset=utf-8")

    return app
