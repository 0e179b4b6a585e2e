"""Create and delete many unrelated Services (headless ClusterIP, no selector) as fast as the API server takes them.

Used by the load balancer's churn test and benchmark: none of these Services may touch
the load balancer's table. Writes go through the client's write pipeline, `window`
at a time, so thousands take seconds, not minutes.
"""

from __future__ import annotations

import asyncio

from testbed.api.v1 import api_pb2 as pb
from testbed.client.client import ApiClient


def headless_service(name: str, namespace: str = "default") -> pb.Service:
    svc = pb.Service()
    svc.metadata.name = name
    svc.metadata.namespace = namespace
    svc.spec.type = "ClusterIP"
    svc.spec.cluster_ip = "None"
    svc.spec.ports.add(name="http", protocol="TCP", port=80)
    return svc


async def _in_windows(calls, window: int) -> None:
    for i in range(0, len(calls), window):
        await asyncio.gather(*(call() for call in calls[i:i + window]))


async def churn(client: ApiClient, count: int, prefix: str = "unrelated", namespace: str = "default",
                window: int = 200) -> dict[str, float]:
    """Create `count` Services, then delete them all; returns seconds per phase."""
    loop = asyncio.get_running_loop()
    names = [f"{prefix}-{i}" for i in range(count)]
    t0 = loop.time()
    await _in_windows([lambda n=n: client.create(headless_service(n, namespace)) for n in names], window)
    t1 = loop.time()
    await _in_windows([lambda n=n: client.delete("Service", n, namespace) for n in names], window)
    return {"create_s": t1 - t0, "delete_s": loop.time() - t1}
