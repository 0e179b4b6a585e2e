"""The kube-proxy process: Services and EndpointSlices in, kernel rules out.

Watch handlers only record what changed (model.ChangeTracker); a
bounded-frequency runner collapses bursts into one sync; each sync builds the
desired state once (model.ProxyState) and hands it to the backend, which
renders and applies it in one atomic write.

A write the kernel refuses is logged and counted, and kube-proxy looks for the Service
ports to blame: it bisects the candidates (what the sync changed, or every Service for a
full sync), loading each group's full ruleset into a scratch network namespace
(backend.check). Those that fail alone are left out (no rules), reported (log line,
kubeproxy_services_failed_to_sync, svclab_kubeproxy_service_rules_failed{service}), and
tried again when they change and at every full sync; the others are applied at once. If
no single Service is to blame, the node keeps the rules it had and the next sync is a
full one.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time

from testbed import simplehttp
from testbed.client.client import ApiClient
from testbed.client.informer import Informer
from testbed.component import run_component
from testbed.proxy import conntrack, kernel
from testbed.proxy.backends import ProxyBackend
from testbed.proxy.healthcheck import HealthCheckServers
from testbed.proxy.metrics import HealthState, ProxyMetrics, metrics_handler
from testbed.proxy.model import ChangeTracker, ProxyState, ServicePortName
from testbed.proxy.runner import BoundedFrequencyRunner

log = logging.getLogger("svclab.kube-proxy")

FULL_SYNC_PERIOD = 60.0
RETRY_AFTER_FAILURE = 1.0
MONITOR_INTERVAL = 1.0  # how often to ask whether someone flushed our rules (upstream: its sync period)


class ProxyServer:
    def __init__(self, client: ApiClient, node_name: str, backend: ProxyBackend, min_sync_period: float,
                 full_sync_period: float = FULL_SYNC_PERIOD) -> None:
        self.client = client
        self.node_name = node_name
        self.backend = backend
        self.services = Informer(client, "Service")
        self.slices = Informer(client, "EndpointSlice")
        self.tracker = ChangeTracker(node_name)
        self.metrics = ProxyMetrics()
        self.health = HealthState(timeout=max(2 * min_sync_period, 10.0))
        self.healthchecks = HealthCheckServers()
        # Every node's kube-proxy starts in the same second here: a full sync period drawn
        # within +-10 % keeps their periodic full syncs from all landing at once.
        full_sync_period *= random.uniform(0.9, 1.1)
        self.runner = BoundedFrequencyRunner(self.sync, min_sync_period, full_sync_period)
        self.full_sync_period = full_sync_period
        self._needs_full = True
        self._last_full = 0.0
        self._udp_endpoints: set[tuple[str, int, str]] = set()
        self._pending = {"services": 0, "endpoints": 0}
        self.failed: dict[ServicePortName, str] = {}  # Service ports left out: the kernel refused their rules
        self._backend_lock = asyncio.Lock()  # one backend call at a time: syncs and the monitor's probes
        # One handler per kind: if the tracker raises for an object, the informer hands it the
        # object again after a back-off, and a sync is requested once it is taken.
        self.services.on_change(self._on_service)
        self.slices.on_change(self._on_slice)

    def _on_service(self, event_type: str, old, new) -> None:
        self.tracker.on_service(event_type, old, new)
        self._queued("services")

    def _on_slice(self, event_type: str, old, new) -> None:
        self.tracker.on_slice(event_type, old, new)
        self._queued("endpoints")

    def _queued(self, what: str) -> None:
        self._pending[what] += 1
        if what == "endpoints":
            self.metrics.endpoint_changes_total.inc()
        self.metrics.service_changes_pending.set(self._pending["services"])
        self.metrics.endpoint_changes_pending.set(self._pending["endpoints"])
        self.health.queued()
        self.metrics.last_queued.set(time.time())
        self.runner.request()

    async def sync(self) -> None:
        async with self._backend_lock:
            await self._sync()

    async def monitor(self, interval: float = MONITOR_INTERVAL) -> None:
        """Repair at once rules someone flushed or deleted (upstream's canary monitor)."""
        while True:
            await asyncio.sleep(interval)
            async with self._backend_lock:
                flushed = await asyncio.to_thread(self.backend.needs_full_sync)
            if flushed:
                self.runner.request()

    async def _sync(self) -> None:
        started = time.perf_counter()
        changed = self.tracker.take()  # applies the pending events to tracker.state
        self._pending = {"services": 0, "endpoints": 0}
        full = (self._needs_full or self.backend.needs_full_sync()
                or time.monotonic() - self._last_full >= self.full_sync_period)
        state = self.tracker.state
        for name in list(self.failed):  # try them again: they changed, or this is a full sync
            if full or name in changed:
                self._recovered(name)
        try:
            try:
                programmed = await self._apply(state, None if full else changed)
            except kernel.RulesFailed as exc:
                log.error("sync failed (%s sync): %s", "full" if full else "partial", exc)
                self.metrics.sync_errors.inc()
                candidates = set(state.services) if full else changed & state.services.keys()
                if not await self._isolate(state, candidates - self.failed.keys()):
                    raise
                programmed = await self._apply(state, None if full else changed)
        except Exception as exc:  # a failed write must not stop the proxy: keep the old rules, retry in full
            if not isinstance(exc, kernel.RulesFailed):
                log.error("sync failed (%s sync): %s", "full" if full else "partial", exc)
                self.metrics.sync_errors.inc()
            self.health.failed(str(exc))
            self._needs_full = True  # what changed is in the state: a full sync writes it
            asyncio.get_running_loop().call_later(RETRY_AFTER_FAILURE, self.runner.request)
            return
        finally:
            self.metrics.services_failed.set(len(self.failed))
        if full:
            self._needs_full = False
            self._last_full = time.monotonic()
            self.metrics.full_syncs.inc()
        else:
            self.metrics.partial_syncs.inc()
        for table, count in programmed.items():
            self.metrics.rules.labels(table=table).set(count)
        self.metrics.sync_duration.observe(time.perf_counter() - started)
        now = time.time()
        for triggered in self.tracker.applied_trigger_times:
            self.metrics.network_programming.observe(max(0.0, now - triggered))
        self.metrics.last_sync.set(now)
        self.metrics.service_changes_pending.set(0)
        self.metrics.endpoint_changes_pending.set(0)
        self.health.updated()
        self._clear_stale_udp(state)
        await self.healthchecks.sync(health_check_ports(state))

    async def _apply(self, state: ProxyState, changed: set[ServicePortName] | None) -> dict[str, int]:
        return await asyncio.to_thread(self.backend.sync, state.without(self.failed.keys()), changed)

    async def _isolate(self, state: ProxyState, candidates: set[ServicePortName]) -> bool:
        """Find the candidates whose rules the kernel refuses on their own (bisection over
        scratch-namespace loads) and leave them out; True if any was found."""
        found = False

        async def bisect(group: list[ServicePortName]) -> None:
            nonlocal found
            try:
                await asyncio.to_thread(self.backend.check, state.only(group))
                return
            except kernel.RulesFailed as exc:
                if len(group) > 1:
                    await bisect(group[:len(group) // 2])
                    await bisect(group[len(group) // 2:])
                    return
                error = exc.output.strip().splitlines()[0] if exc.output.strip() else str(exc)
            log.error("service %s: the kernel refused its rules, left out until it changes: %s", group[0], error)
            self.failed[group[0]] = error
            self.metrics.service_failed.labels(service=str(group[0])).set(1)
            found = True

        if candidates:
            await bisect(sorted(candidates))
        return found

    def _recovered(self, name: ServicePortName) -> None:
        del self.failed[name]
        try:
            self.metrics.service_failed.remove(str(name))
        except KeyError:
            pass

    def _clear_stale_udp(self, state: ProxyState) -> None:
        """Delete conntrack entries toward UDP endpoints that are no longer used (upstream does)."""
        now = udp_endpoints(state)
        for service_ip, node_port, endpoint_ip in self._udp_endpoints - now:
            conntrack.delete_udp_flows(service_ip, 0, endpoint_ip)
            if node_port:
                conntrack.delete_udp_flows(None, node_port, endpoint_ip)
        self._udp_endpoints = now


    async def run(self, metrics_address: str = "") -> None:
        if metrics_address:
            host, _, port = metrics_address.rpartition(":")
            await simplehttp.serve(metrics_handler(self.metrics, self.health, self.backend.name), host, int(port))
        tasks = [asyncio.create_task(i.run()) for i in (self.services, self.slices)]
        await self.services.synced.wait()
        await self.slices.synced.wait()
        tasks.append(asyncio.create_task(self.runner.run()))
        tasks.append(asyncio.create_task(self.monitor()))
        self.runner.request()
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            task.result()


def run(address: str, token: str, node_name: str, backend: ProxyBackend, min_sync_period: float,
        metrics_address: str) -> None:
    servers: list[ProxyServer] = []

    async def work(client: ApiClient) -> None:
        servers.append(ProxyServer(client, node_name, backend, min_sync_period))
        await servers[0].run(metrics_address)

    async def cleanup() -> None:
        for server in servers:
            server.healthchecks.close()

    run_component(address, token, work, cleanup)


def udp_endpoints(state: ProxyState) -> set[tuple[str, int, str]]:
    """(service IP, node port, endpoint IP) of every UDP endpoint in use."""
    out = set()
    for name, sp in state.services.items():
        if sp.protocol == "UDP":
            for ep in state.categorize(name).all_reachable:
                out.add((sp.cluster_ip, sp.node_port, ep.ip))
    return out


def health_check_ports(state: ProxyState) -> dict[int, tuple[str, str, int]]:
    """healthCheckNodePort -> (namespace, name, local endpoints) for Local LoadBalancer Services."""
    out: dict[int, tuple[str, str, int]] = {}
    for name, sp in state.services.items():
        if sp.health_check_node_port:
            local = len(state.categorize(name).local)
            prev = out.get(sp.health_check_node_port, (name.namespace, name.name, 0))
            out[sp.health_check_node_port] = (name.namespace, name.name, max(prev[2], local))
    return out
