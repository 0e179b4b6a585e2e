"""healthCheckNodePort servers: one per LoadBalancer Service with externalTrafficPolicy Local.

Like upstream's, each answers on every node address: 200 when this node has
local endpoints for the Service, 503 otherwise, with a JSON body the cloud
load balancer (and a curious student) can read.
"""

from __future__ import annotations

import asyncio
import json
import logging

from testbed import simplehttp

log = logging.getLogger("svclab.kube-proxy")


class HealthCheckServers:
    def __init__(self, node_ip: str = "") -> None:
        self.node_ip = node_ip
        self._servers: dict[int, asyncio.Server] = {}
        self._local: dict[int, tuple[str, str, int]] = {}  # port -> (namespace, name, local endpoints)

    async def sync(self, wanted: dict[int, tuple[str, str, int]]) -> None:
        """wanted: healthCheckNodePort -> (namespace, name, number of local endpoints)."""
        self._local = dict(wanted)
        for port in list(self._servers):
            if port not in wanted:
                self._servers.pop(port).close()
        for port in wanted:
            if port not in self._servers:
                try:
                    self._servers[port] = await simplehttp.serve(self._handler(port), self.node_ip, port)
                except OSError as exc:
                    log.error("healthCheckNodePort %d: %s", port, exc)

    def _handler(self, port: int):
        def handle(_method: str, _path: str, _client) -> tuple[int, str, bytes]:
            namespace, name, local = self._local.get(port, ("", "", 0))
            body = json.dumps({"service": {"namespace": namespace, "name": name}, "localEndpoints": local,
                               "serviceProxyHealthy": True}).encode()
            return (200 if local > 0 else 503), "application/json", body
        return handle

    def close(self) -> None:
        for server in self._servers.values():
            server.close()
        self._servers.clear()
