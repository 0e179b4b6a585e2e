"""The cloud-controller loop: LoadBalancer Services -> external IPs, status, and the load balancer table.

Runs in the router's network namespace (it health-checks node addresses directly) and
talks to the API server over the state directory's Unix socket. After a restart it
re-learns which Service holds which IP from the Services' status.loadBalancer.ingress.
Why a Service is pending is written as its IPAllocated condition (`svclab describe svc`).

Only LoadBalancer Services (and Services that stop being one) and changes of the nodes'
addresses touch the table: every other Service event is dropped in the informer's
handler, so thousands of unrelated Services cost no table rebuild and never stall the
health checks that share this event loop (issue #10: rebuilding the table from every
Service on every Service event blocked the loop for seconds, the probes timed out and
every node was marked unhealthy).
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from testbed import fault
from testbed.api.meta import now_rfc3339
from testbed.api.v1 import api_pb2 as pb
from testbed.client.client import ApiClient
from testbed.client.informer import Informer, WorkQueue, key_of, run_worker
from testbed.cloud.feed import TableFeed
from testbed.cloud.health import HealthChecker, HealthSettings, Target
from testbed.cloud.ipam import Pool
from testbed.component import run_component
from testbed.cloud.lb_table import PROTOCOLS, LoadBalancer, Port, Table

log = logging.getLogger("svclab.cloud")
CONDITION = "IPAllocated"


def is_lb(svc: pb.Service | None) -> bool:
    return svc is not None and svc.spec.type == "LoadBalancer"


def health_target(svc: pb.Service, node_ip: str) -> Target | None:
    """What to probe on one node for this Service; None: nothing to probe (UDP-only Cluster: node counts as up)."""
    if svc.spec.external_traffic_policy == "Local":
        return Target("http", node_ip, svc.spec.health_check_node_port)
    tcp = next((p for p in svc.spec.ports if p.protocol == "TCP" and p.node_port), None)
    return Target("tcp", node_ip, tcp.node_port) if tcp else None


def node_ip(node: pb.Node | None) -> str:
    if node is None:
        return ""
    return next((a.address for a in node.status.addresses if a.type == "InternalIP"), "")


def has_condition(svc: pb.Service | None) -> bool:
    return svc is not None and any(c.type == CONDITION for c in svc.status.conditions)


def lb_relevant(old: pb.Service | None, new: pb.Service | None) -> bool:
    """Whether a Service event can concern the load balancer: it is, was, or still carries the marks of one."""
    return is_lb(old) or is_lb(new) or has_condition(new) or bool(new and new.status.load_balancer.ingress)


def desired_status(svc: pb.Service, ip: str | None, reason: str) -> pb.ServiceStatus:
    status = pb.ServiceStatus()
    status.CopyFrom(svc.status)
    status.ClearField("load_balancer")
    if ip:
        status.load_balancer.ingress.add(ip=ip)
    kept = [c for c in status.conditions if c.type != CONDITION]
    del status.conditions[:]
    status.conditions.extend(kept)
    if is_lb(svc):
        old = next((c for c in svc.status.conditions if c.type == CONDITION), None)
        state, why = ("True", "Allocated") if ip else ("False", "AllocationFailed")
        message = f"{ip} from the pool" if ip else reason
        changed = old is None or (old.status, old.reason, old.message) != (state, why, message)
        status.conditions.add(type=CONDITION, status=state, reason=why, message=message,
                              last_transition_time=now_rfc3339() if changed else old.last_transition_time)
    return status


class CloudController:
    def __init__(self, client: ApiClient, pool: Pool, feed: TableFeed, health: HealthSettings) -> None:
        self.client = client
        self.pool = pool
        self.feed = feed
        self.services = Informer(client, "Service")
        self.nodes = Informer(client, "Node")
        self.queue = WorkQueue()
        self.pending: set = set()  # LoadBalancer Services without an IP, retried when one is released
        self.checker = HealthChecker(health, self.refresh)
        self.lbs: dict = {}  # key -> LoadBalancer Service: all that refresh() looks at
        self.node_ips: dict[str, str] = {}  # node name -> InternalIP
        self.services.on_change(self._service_event)
        self.nodes.on_change(self._node_event)

    def _service_event(self, _type: str, old: pb.Service | None, new: pb.Service | None) -> None:
        key = key_of(new or old)
        if is_lb(new):
            self.lbs[key] = new
        else:
            self.lbs.pop(key, None)
        if lb_relevant(old, new) or key in self.pool.held or key in self.pending:
            self.queue.add(key)

    def _node_event(self, _type: str, old: pb.Node | None, new: pb.Node | None) -> None:
        """Only a node's address matters here (not its heartbeats): refresh when one comes, goes or moves."""
        name = (new or old).metadata.name
        ip = node_ip(new)
        if self.node_ips.get(name, "") == ip:
            return
        if ip:
            self.node_ips[name] = ip
        else:
            self.node_ips.pop(name, None)
        self.refresh()

    async def run(self) -> None:
        tasks = [asyncio.create_task(self.services.run()), asyncio.create_task(self.nodes.run())]
        await self.services.synced.wait()
        await self.nodes.synced.wait()
        for svc in self.lbs.values():  # re-learn what we gave out before a restart
            for ingress in svc.status.load_balancer.ingress:
                if not self.pool.adopt(key_of(svc), ingress.ip):
                    log.warning("%s/%s shows %s, which is not ours to keep", *key_of(svc), ingress.ip)
        self.refresh()  # starts the health checks
        await self.checker.settled(timeout=2 * self.checker.settings.timeout + 0.5)
        self.refresh()
        await self.feed.start()
        tasks.append(asyncio.create_task(run_worker("cloud", self.queue, self.reconcile)))
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            task.result()

    async def reconcile(self, key) -> None:
        svc = self.services.get(*key)
        fault.check(svc, "cloud-controller")
        if not is_lb(svc):
            self.pending.discard(key)
            if self.pool.release(key):
                log.info("%s/%s: released its external IP", *key)
                for waiting in sorted(self.pending):  # first come, first served
                    self.queue.add(waiting)
            if svc is not None and any(c.type == CONDITION for c in svc.status.conditions):
                await self._write_status(svc, None, "")
        else:
            held = self.pool.held.get(key)
            ip, reason = self.pool.allocate(key, svc.spec.load_balancer_ip)
            if ip is None:
                log.info("%s/%s: pending: %s", *key, reason)
                self.pending.add(key)
            else:
                self.pending.discard(key)
            if held is not None and held != ip:
                for waiting in sorted(self.pending - {key}):
                    self.queue.add(waiting)
            await self._write_status(svc, ip, reason)
        self.refresh()

    async def _write_status(self, svc: pb.Service, ip: str | None, reason: str) -> None:
        status = desired_status(svc, ip, reason)
        if status == svc.status:
            return
        update = pb.Service()
        update.CopyFrom(svc)
        update.status.CopyFrom(status)
        await self.client.update_status(update)

    def refresh(self) -> None:
        """Recompute the health targets and the table; publish it if it changed."""
        nodes = sorted(set(self.node_ips.values()))
        lbs, targets = [], set()
        for key, svc in sorted(self.lbs.items()):
            ip = self.pool.held.get(key)
            if ip is None:
                continue
            backends = []
            for node in nodes:
                target = health_target(svc, node)
                if target is not None:
                    targets.add(target)
                if target is None or target in self.checker.healthy:
                    backends.append(node)
            ports = tuple(Port(p.protocol, p.port, p.node_port) for p in svc.spec.ports
                          if p.protocol in PROTOCOLS and p.node_port)
            lbs.append(LoadBalancer(ip, "/".join(key_of(svc)), ports, tuple(backends),
                                    tuple(r.strip() for r in svc.spec.load_balancer_source_ranges)))
        self.checker.track(targets)
        self.feed.publish(Table(tuple(lbs)))


def run(address: str, token: str, pool: str, feed_path: Path, health: HealthSettings) -> None:
    feed = TableFeed(feed_path)

    async def work(client: ApiClient) -> None:
        await CloudController(client, Pool(pool), feed, health).run()

    async def cleanup() -> None:
        await feed.close()

    run_component(address, token, work, cleanup)
