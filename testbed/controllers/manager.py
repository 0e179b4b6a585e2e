"""The controller-manager process: shared informers, every controller, one event loop."""

from __future__ import annotations

import asyncio
import logging

from testbed.client.client import ApiClient
from testbed.client.informer import run_worker
from testbed.component import run_component
from testbed.controllers.base import Informers
from testbed.controllers.deployment import DeploymentController
from testbed.controllers.endpointslice import EndpointSliceController
from testbed.controllers.garbage import GarbageCollector
from testbed.controllers.nodes import NodeIpam, NodeLifecycle
from testbed.controllers.scheduler import Scheduler

log = logging.getLogger("svclab.controller-manager")


async def run_controllers(client: ApiClient, cluster_cidr: str, node_grace_period: float) -> None:
    informers = Informers.create(client)
    deployments = DeploymentController(client, informers)
    scheduler = Scheduler(client, informers)
    slices = EndpointSliceController(client, informers)
    ipam = NodeIpam(client, informers, cluster_cidr)
    lifecycle = NodeLifecycle(client, informers, node_grace_period)
    gc = GarbageCollector(client, informers)

    tasks = [asyncio.create_task(i.run(), name=f"informer-{i.kind}") for i in informers.all()]
    for informer in informers.all():
        await informer.synced.wait()
    log.info("caches synced; starting controllers")
    for name, controller in (("deployment", deployments), ("scheduler", scheduler),
                             ("endpointslice", slices), ("nodeipam", ipam)):
        tasks.append(asyncio.create_task(run_worker(name, controller.queue, controller.reconcile), name=name))
    tasks.append(asyncio.create_task(lifecycle.run(), name="nodelifecycle"))
    tasks.append(asyncio.create_task(gc.run(), name="garbagecollector"))
    # A controller that dies with an unexpected error takes the process down
    # (loudly) rather than leaving the cluster half-managed.
    done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    for task in done:
        task.result()


def run(address: str, token: str, cluster_cidr: str, node_grace_period: float) -> None:
    run_component(address, token, lambda client: run_controllers(client, cluster_cidr, node_grace_period))
