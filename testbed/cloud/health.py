"""Node health checks as a cloud load balancer runs them, from the router's namespace.

externalTrafficPolicy Cluster: a TCP connect to nodeIP:nodePort. Local: an HTTP GET of
nodeIP:healthCheckNodePort (kube-proxy answers 200 only where the Service has local
endpoints). A new target's first probe decides its state (so a restarted
cloud-controller republishes the same nodes at once, instead of none until the
thresholds pass); after that it turns healthy after `healthy_threshold` successes in a
row and unhealthy after `unhealthy_threshold` failures in a row.
Probes start every `interval` (start to start), each bounded by `timeout`, so with the
defaults (0.5 s, 0.4 s, 2 failures) a dead node is out within 1.4 s.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Callable

log = logging.getLogger("svclab.cloud")


@dataclass(frozen=True)
class HealthSettings:
    interval: float = 0.5
    timeout: float = 0.4
    healthy_threshold: int = 2
    unhealthy_threshold: int = 2


@dataclass(frozen=True)
class Target:
    kind: str  # "tcp" or "http"
    ip: str
    port: int

    def __str__(self) -> str:
        return f"{self.kind}://{self.ip}:{self.port}"


async def probe(target: Target, timeout: float) -> bool:
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(target.ip, target.port)
            try:
                if target.kind == "tcp":
                    return True
                writer.write(f"GET /healthz HTTP/1.0\r\nHost: {target.ip}\r\n\r\n".encode())
                status = await reader.readline()
                return status.split()[1:2] == [b"200"]
            finally:
                writer.close()
    except (OSError, TimeoutError, IndexError):
        return False


class HealthChecker:
    """Probes a changing set of targets; calls on_change() whenever one turns healthy or unhealthy."""

    def __init__(self, settings: HealthSettings, on_change: Callable[[], None]) -> None:
        self.settings = settings
        self.on_change = on_change
        self.healthy: set[Target] = set()
        self.known: set[Target] = set()  # probed at least once
        self._tasks: dict[Target, asyncio.Task] = {}

    def track(self, targets: set[Target]) -> None:
        for target in self._tasks.keys() - targets:
            self._tasks.pop(target).cancel()
            self.healthy.discard(target)
            self.known.discard(target)
        for target in targets - self._tasks.keys():
            self._tasks[target] = asyncio.create_task(self._run(target), name=f"health {target}")

    async def settled(self, timeout: float) -> None:
        """Wait (at most timeout) until every tracked target has been probed once."""
        deadline = time.monotonic() + timeout
        while self._tasks.keys() - self.known and time.monotonic() < deadline:
            await asyncio.sleep(0.02)

    def close(self) -> None:
        self.track(set())

    async def _run(self, target: Target) -> None:
        s = self.settings
        streak = 0  # > 0: successes in a row, < 0: failures in a row
        next_start = time.monotonic()
        while True:
            ok = await probe(target, s.timeout)
            streak = max(streak, 0) + 1 if ok else min(streak, 0) - 1
            was = target in self.healthy
            if target not in self.known:
                self.known.add(target)
                if ok:
                    self.healthy.add(target)
                log.info("%s is %s", target, "healthy" if ok else "unhealthy")
                self.on_change()
            elif not was and streak >= s.healthy_threshold:
                self.healthy.add(target)
                log.info("%s is healthy", target)
                self.on_change()
            elif was and -streak >= s.unhealthy_threshold:
                self.healthy.discard(target)
                log.info("%s is unhealthy (%d failed checks)", target, -streak)
                self.on_change()
            next_start += s.interval
            await asyncio.sleep(max(0.0, next_start - time.monotonic()))
