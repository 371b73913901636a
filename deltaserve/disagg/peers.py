"""The router's view of its instances: health, load, and which one takes the next request."""

from __future__ import annotations

import asyncio
import itertools
import logging
from dataclasses import dataclass

import httpx

logger = logging.getLogger(__name__)


@dataclass
class Instance:
    url: str
    role: str
    healthy: bool = True  # until the first check says otherwise
    in_flight: int = 0
    agent_name: str | None = None
    last_error: str | None = None
    num_requests: int = 0
    num_failures: int = 0

    def mark_down(self, error: BaseException | str) -> None:
        if self.healthy:
            logger.warning("%s instance %s is down: %s", self.role, self.url, error)
        self.healthy = False
        self.last_error = error if isinstance(error, str) else f"{type(error).__name__}: {error}"


class InstancePool:
    """Instances of one role; ``pick`` takes the healthy one with the fewest requests in flight
    (round robin among equals)."""

    def __init__(self, role: str, urls: list[str]):
        if not urls:
            raise ValueError(f"--{role}: at least one {role} instance URL is needed")
        seen = [u.rstrip("/") for u in urls]
        if len(set(seen)) != len(seen):
            raise ValueError(f"--{role}: an instance URL is given twice: {seen}")
        self.role = role
        self.instances = [Instance(url, role) for url in seen]
        self._turn = itertools.count()

    def pick(self, exclude: set[str] = frozenset()) -> Instance | None:
        candidates = [i for i in self.instances if i.healthy and i.url not in exclude]
        if not candidates:
            return None
        turn = next(self._turn)
        n = len(self.instances)
        return min(candidates, key=lambda i: (i.in_flight, (self.instances.index(i) - turn) % n))

    def describe(self) -> list[dict]:
        return [{"url": i.url, "healthy": i.healthy, "in_flight": i.in_flight, "agent_name": i.agent_name,
                 "last_error": i.last_error} for i in self.instances]

    async def check(self, client: httpx.AsyncClient) -> None:
        """One health round: ``/health`` and the agent name (which changes when an instance restarts)."""
        await asyncio.gather(*(self._check_one(client, i) for i in self.instances))

    async def _check_one(self, client: httpx.AsyncClient, instance: Instance) -> None:
        try:
            health = await client.get(f"{instance.url}/health", timeout=2.0)
            if health.status_code != 200:
                instance.mark_down(f"/health answered {health.status_code}")
                return
            info = (await client.get(f"{instance.url}/disagg/handshake", timeout=2.0)).json()
        except (httpx.HTTPError, ValueError) as exc:
            instance.mark_down(exc)
            return
        if info.get("role") != self.role:
            instance.mark_down(f"it serves role {info.get('role')!r}, not {self.role!r}")
            return
        if instance.agent_name is not None and instance.agent_name != info.get("agent_name"):
            logger.info("%s instance %s restarted (agent %s -> %s)", self.role, instance.url, instance.agent_name,
                        info.get("agent_name"))
        if not instance.healthy:
            logger.info("%s instance %s is up", self.role, instance.url)
        instance.agent_name = info.get("agent_name")
        instance.healthy, instance.last_error = True, None
