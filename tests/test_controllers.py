"""The controller-manager process alone, against a real API server.

These tests are of the controller-manager, not of the kubelet: no node network, no pods
running. `NodeAgents` plays the kubelet's part through exactly the API calls a kubelet makes
(Node heartbeats as status updates, a pod's IP, phase and Ready condition, finishing a
terminating pod with a grace-0 delete), because each test needs to control that part in
ways a real kubelet won't be told to: a node that stops its heartbeats at a chosen moment
while the others go on, a pod that turns unready on request, a terminating pod that nobody
finishes, pods that become ready at once so a rollout's every step is seen, 101 pods on a
machine without 101 namespaces. They run without root (the unit tier).

The same controllers with the real kubelet (pods as namespaces, readiness probes, heartbeats
from kubelet processes, real deletions) are tested end to end in tests/test_cluster.py:
Deployment pods spread over nodes and serving (test_up_runs_the_seed_deployment_on_real_namespaces),
a deleted pod replaced (test_deleted_pod_namespace_and_files_go_and_the_pod_is_replaced),
readiness probes gating Ready (test_container_command_runs_unprivileged_and_readiness_probes_gate_ready),
a node whose kubelet hangs going NotReady and its pods leaving the endpoints, then garbage
collection of a terminating pod there and the Deployment's replacement on the other node
(test_node_failure_takes_its_pods_out_of_the_endpoints_and_gc_finishes_their_deletion), and a
rolling update within maxSurge / maxUnavailable replayed from a watch
(test_rollout_with_the_real_kubelet_stays_within_max_surge_and_max_unavailable).
"""

from __future__ import annotations

import asyncio
import ipaddress
import time

import pytest

from testbed.api.errors import Conflict, NotFound
from testbed.api.meta import now_rfc3339, parse_rfc3339
from tests.builders import deployment, node, service
from tests.conftest import run, update_with_retry

pytestmark = pytest.mark.unit


class NodeAgents:
    """Heartbeats for some nodes and pod status for the pods bound to them."""

    def __init__(self, client, names):
        self.client = client
        self.alive = set(names)
        self.ready_pods = True
        self.finish_deletions = True  # False: terminating pods stay (a kubelet still in its grace period)

    async def register(self, names):
        for i, name in enumerate(sorted(names)):
            await self.client.create(node(name, f"172.18.0.{i + 2}"))

    async def tick(self):
        for name in list(self.alive):
            n = await self.client.get("Node", name)
            n.status.conditions[0].last_heartbeat_time = now_rfc3339()
            n.status.conditions[0].status = "True"
            n.metadata.resource_version = ""  # a heartbeat is unconditional, as the kubelet's
            await self.client.update_status(n)
        pods, _ = await self.client.list("Pod")
        nodes = {n.metadata.name: n for n in (await self.client.list("Node"))[0]}
        for pod in pods:
            if pod.spec.node_name not in self.alive:
                continue
            if pod.metadata.deletion_timestamp:
                if self.finish_deletions:
                    await self._ignore(self.client.delete("Pod", pod.metadata.name, pod.metadata.namespace, 0))
                continue
            if pod.status.pod_ip or not nodes[pod.spec.node_name].spec.pod_cidr:
                continue
            cidr = ipaddress.ip_network(nodes[pod.spec.node_name].spec.pod_cidr)
            used = {p.status.pod_ip for p in pods}
            pod.status.pod_ip = next(str(ip) for ip in list(cidr.hosts())[1:] if str(ip) not in used)
            pod.status.phase = "Running"
            pod.status.conditions.add(type="Ready", status="True" if self.ready_pods else "False")
            await self._ignore(self.client.update_status(pod))

    @staticmethod
    async def _ignore(call):
        try:
            await call
        except (Conflict, NotFound):
            pass

    async def run_until(self, predicate, timeout=15.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            await self.tick()
            if await predicate():
                return
            await asyncio.sleep(0.2)
        raise AssertionError(f"condition not met within {timeout}s")


async def active_pods(c, label="app=web"):
    pods, _ = await c.list("Pod", label_selector=label)
    return [p for p in pods if not p.metadata.deletion_timestamp]


async def slice_addresses(c, svc="web"):
    slices, _ = await c.list("EndpointSlice", label_selector=f"kubernetes.io/service-name={svc}")
    return sorted(a for s in slices for e in s.endpoints if e.conditions.ready for a in e.addresses)


def test_nodes_get_distinct_pod_cidrs(apiserver, controller_manager):
    async def scenario():
        async with apiserver.client() as c:
            agents = NodeAgents(c, [f"node-{i}" for i in range(5)])
            await agents.register(agents.alive)

            async def all_have_cidrs():
                nodes, _ = await c.list("Node")
                return all(n.spec.pod_cidr for n in nodes)

            await agents.run_until(all_have_cidrs)
            cidrs = [n.spec.pod_cidr for n in (await c.list("Node"))[0]]
            assert len(set(cidrs)) == 5
            assert all(ipaddress.ip_network(x).subnet_of(ipaddress.ip_network("10.244.0.0/16")) for x in cidrs)
    run(scenario())


def test_deployment_scales_3_10_0_spread_over_ready_nodes(apiserver, controller_manager):
    async def scenario():
        async with apiserver.client() as c:
            agents = NodeAgents(c, ["node-a", "node-b", "node-c"])
            await agents.register(agents.alive)
            await c.create(deployment("web", replicas=3))

            async def count_is(n):
                async def check():
                    pods = await active_pods(c)
                    d = await c.get("Deployment", "web")
                    return len(pods) == n and all(p.status.pod_ip for p in pods) and d.status.ready_replicas == n
                return check

            await agents.run_until(await count_is(3))
            pods = await active_pods(c)
            assert sorted(p.spec.node_name for p in pods) == ["node-a", "node-b", "node-c"]
            assert all(p.metadata.name.startswith("web-") and len(p.metadata.name.split("-")) == 3 for p in pods)

            await update_with_retry(c, "Deployment", "web", lambda d: setattr(d.spec, "replicas", 10))
            await agents.run_until(await count_is(10))
            per_node = {}
            for p in await active_pods(c):
                per_node[p.spec.node_name] = per_node.get(p.spec.node_name, 0) + 1
            assert sorted(per_node.values()) == [3, 3, 4]

            await update_with_retry(c, "Deployment", "web", lambda d: setattr(d.spec, "replicas", 0))

            async def none_left():
                pods, _ = await c.list("Pod")
                d = await c.get("Deployment", "web")
                return not pods and (d.status.replicas, d.status.ready_replicas) == (0, 0)

            await agents.run_until(none_left)
    run(scenario())


def test_deleted_pods_are_replaced(apiserver, controller_manager):
    async def scenario():
        async with apiserver.client() as c:
            agents = NodeAgents(c, ["node-a"])
            await agents.register(agents.alive)
            await c.create(deployment("web", replicas=2))

            async def two_running():
                pods = await active_pods(c)
                return len(pods) == 2 and all(p.status.pod_ip for p in pods)

            await agents.run_until(two_running)
            victim = (await active_pods(c))[0].metadata.name
            await c.delete("Pod", victim, grace_period=0)
            await agents.run_until(two_running)
            assert victim not in {p.metadata.name for p in await active_pods(c)}
    run(scenario())


def test_endpoint_slices_follow_pods_and_readiness(apiserver, controller_manager):
    async def scenario():
        async with apiserver.client() as c:
            agents = NodeAgents(c, ["node-a", "node-b"])
            await agents.register(agents.alive)
            await c.create(service("web", ports=[{"name": "http", "port": 80, "targetPort": "web-port"}]))
            await c.create(deployment("web", replicas=3, port=8080, port_name="web-port"))

            async def three_ready():
                return len(await slice_addresses(c)) == 3

            await agents.run_until(three_ready)
            slices, _ = await c.list("EndpointSlice", label_selector="kubernetes.io/service-name=web")
            assert len(slices) == 1
            eps = slices[0]
            assert [(p.name, p.protocol, p.port) for p in eps.ports] == [("http", "TCP", 8080)]  # named port resolved
            assert {e.node_name for e in eps.endpoints} <= {"node-a", "node-b"}
            assert all(e.target_ref.kind == "Pod" for e in eps.endpoints)
            assert eps.metadata.owner_references[0].kind == "Service"
            pods = await active_pods(c)
            assert sorted(p.status.pod_ip for p in pods) == await slice_addresses(c)

            # a pod turning unready leaves the ready set but stays listed as not ready
            pod = pods[0]
            pod.status.conditions[0].status = "False"
            changed_at = time.time()
            await c.update_status(pod)

            async def two_ready():
                return len(await slice_addresses(c)) == 2

            await agents.run_until(two_ready)
            # the slice says when the change that made it was seen (kube-proxy's latency starts there)
            slices, _ = await c.list("EndpointSlice", label_selector="kubernetes.io/service-name=web")
            triggered = parse_rfc3339(slices[0].metadata.annotations["endpoints.kubernetes.io/last-change-trigger-time"])
            assert changed_at <= triggered < changed_at + 2, (changed_at, triggered)

            # a pod being deleted gracefully is terminating: ready false, serving true
            other = pods[1]
            await c.delete("Pod", other.metadata.name)
            agents.alive.discard(other.spec.node_name)  # nobody finishes it yet

            async def terminating_seen():
                slices, _ = await c.list("EndpointSlice", label_selector="kubernetes.io/service-name=web")
                return any(e.conditions.terminating and e.conditions.serving and not e.conditions.ready
                           for s in slices for e in s.endpoints)

            await agents.run_until(terminating_seen)
    run(scenario())


def test_node_that_stops_heartbeats_becomes_not_ready_and_leaves_endpoints(apiserver, controller_manager):
    async def scenario():
        async with apiserver.client() as c:
            agents = NodeAgents(c, ["node-a", "node-b"])
            await agents.register(agents.alive)
            await c.create(service("web"))
            await c.create(deployment("web", replicas=4))

            async def four_ready():
                return len(await slice_addresses(c)) == 4

            await agents.run_until(four_ready)
            agents.alive.discard("node-b")
            started = time.monotonic()

            async def node_b_out():
                n = await c.get("Node", "node-b")
                ready = n.status.conditions[0]
                on_b = {p.status.pod_ip for p in await active_pods(c) if p.spec.node_name == "node-b"}
                return ready.status == "Unknown" and not (on_b & set(await slice_addresses(c)))

            await agents.run_until(node_b_out, timeout=10)
            # grace period is 2 s in the fixture; detection needs at least that
            assert time.monotonic() - started >= 2.0
            assert len(await slice_addresses(c)) == 2
    run(scenario())


def test_deleting_owners_collects_dependents(apiserver, controller_manager):
    async def scenario():
        async with apiserver.client() as c:
            agents = NodeAgents(c, ["node-a"])
            await agents.register(agents.alive)
            await c.create(service("web"))
            await c.create(deployment("web", replicas=2))

            async def ready():
                return len(await slice_addresses(c)) == 2

            await agents.run_until(ready)
            await c.delete("Deployment", "web")
            await c.delete("Service", "web")

            async def all_gone():
                pods, _ = await c.list("Pod")
                slices, _ = await c.list("EndpointSlice")
                return not pods and not slices

            await agents.run_until(all_gone)
    run(scenario())


def test_template_change_rolls_out_without_dropping_below_desired(apiserver, controller_manager):
    async def scenario():
        async with apiserver.client() as c:
            agents = NodeAgents(c, ["node-a", "node-b"])
            await agents.register(agents.alive)
            await c.create(service("web"))
            await c.create(deployment("web", replicas=4, image="v1"))

            async def rolled(image):
                async def check():
                    pods = await active_pods(c)
                    return len(pods) == 4 and all(p.spec.containers[0].image == image and p.status.pod_ip for p in pods)
                return check

            await agents.run_until(await rolled("v1"))

            async def all_in_slices():  # the slice follows the pods a moment later: the baseline first
                return len(await slice_addresses(c)) == 4
            await agents.run_until(all_in_slices)
            await update_with_retry(c, "Deployment", "web",
                                    lambda d: setattr(d.spec.template.spec.containers[0], "image", "v2"))
            lowest = 4
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                await agents.tick()
                lowest = min(lowest, len(await slice_addresses(c)))
                if await (await rolled("v2"))():
                    break
                await asyncio.sleep(0.1)
            assert await (await rolled("v2"))()
            assert lowest >= 3  # maxUnavailable 25% of 4
            d = await c.get("Deployment", "web")
            assert d.status.updated_replicas == 4 and d.status.observed_generation == d.metadata.generation
    run(scenario())


def test_services_without_selector_keep_user_slices(apiserver, controller_manager):
    async def scenario():
        async with apiserver.client() as c:
            from tests.builders import obj
            await c.create(service("external", selector={}))
            await c.create(obj({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                                "metadata": {"name": "external-1", "labels": {"kubernetes.io/service-name": "external"}},
                                "addressType": "IPv4", "ports": [{"port": 8080}],
                                "endpoints": [{"addresses": ["10.244.9.9"]}]}))
            await asyncio.sleep(2)
            slices, _ = await c.list("EndpointSlice")
            assert [s.metadata.name for s in slices] == ["external-1"]
    run(scenario())


def test_a_slice_holds_100_endpoints_the_101st_goes_to_a_second_one(apiserver, controller_manager):
    async def scenario():
        async with apiserver.client() as c:
            agents = NodeAgents(c, ["node-a", "node-b"])
            await agents.register(agents.alive)
            await c.create(service("web", ports=[{"name": "http", "port": 80, "targetPort": 8080}]))
            await c.create(deployment("web", replicas=101))

            async def ready(n):
                async def check():
                    return len(await slice_addresses(c)) == n
                return check

            async def slices():
                items, _ = await c.list("EndpointSlice", label_selector="kubernetes.io/service-name=web")
                return items

            await agents.run_until(await ready(101), timeout=60)
            items = await slices()
            assert sorted(len(s.endpoints) for s in items) == [1, 100]
            addresses = [a for s in items for e in s.endpoints for a in e.addresses]
            assert sorted(addresses) == sorted(p.status.pod_ip for p in await active_pods(c))  # each pod once
            assert all([(p.name, p.port) for p in s.ports] == [("http", 8080)] for s in items)
            assert all(s.metadata.owner_references[0].name == "web" for s in items)

            await update_with_retry(c, "Deployment", "web", lambda d: setattr(d.spec, "replicas", 100))

            async def one_full_slice():
                items = await slices()
                return len(items) == 1 and len(items[0].endpoints) == 100 and len(await active_pods(c)) == 100

            await agents.run_until(one_full_slice, timeout=30)  # 100 fit in one: the second slice goes
    run(scenario())


def rolling_deployment(name: str, replicas: int, image: str, max_surge, max_unavailable):
    from tests.builders import obj
    return obj({
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name},
        "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": name}},
                 "strategy": {"type": "RollingUpdate",
                              "rollingUpdate": {"maxSurge": max_surge, "maxUnavailable": max_unavailable}},
                 "template": {"metadata": {"labels": {"app": name}},
                              "spec": {"containers": [{"name": "web", "image": image, "ports": [{"containerPort": 8080}]}]}}},
    })


async def watch_rollout(c, label: str, done, started: asyncio.Event) -> tuple[int, int]:
    """(most active pods, fewest ready active pods) at any revision of a rollout: a list, then a
    watch of every pod event since: exact, however fast the pods come and go."""
    from testbed.controllers.base import pod_is_active, pod_is_ready
    items, start = await c.list("Pod", label_selector=label)
    pods = {p.metadata.name: p for p in items}
    most, fewest = 0, None
    started.set()
    async for item in c.watch(kind="Pod", resource_version=start, label_selector=label):
        if item.type == "BOOKMARK":
            continue
        if item.type == "DELETED":
            pods.pop(item.obj.metadata.name, None)
        else:
            pods[item.obj.metadata.name] = item.obj
        active = [p for p in pods.values() if pod_is_active(p)]
        most = max(most, len(active))
        ready = sum(pod_is_ready(p) for p in active)
        fewest = ready if fewest is None else min(fewest, ready)
        if done(active):
            return most, fewest
    raise AssertionError("watch ended")


@pytest.mark.parametrize("replicas, surge, unavailable, most", [
    (4, 1, 0, 5),  # one new pod at a time, none of the old ones before it is ready
    (4, "50%", 0, 6),  # 50 % of 4: two above desired
    (10, "25%", "25%", 13),  # the defaults: ceil(2.5) = 3 above, floor(2.5) = 2 below
])
def test_rollout_honours_max_surge_and_max_unavailable(apiserver, controller_manager, replicas, surge, unavailable, most):
    """Every pod event of the rollout is replayed from a watch: at no revision are there more
    than replicas + maxSurge pods (and the surge is used), nor fewer ready than replicas - maxUnavailable."""
    async def scenario():
        async with apiserver.client() as c:
            agents = NodeAgents(c, ["node-a", "node-b"])
            await agents.register(agents.alive)
            await c.create(rolling_deployment("web", replicas, "v1", surge, unavailable))

            async def rolled(image):
                pods = await active_pods(c)
                return len(pods) == replicas and all(p.spec.containers[0].image == image and p.status.pod_ip
                                                     and p.status.conditions for p in pods)

            await agents.run_until(lambda: rolled("v1"))
            done = lambda active: len(active) == replicas and all(
                p.spec.containers[0].image == "v2" and p.status.pod_ip for p in active)
            started = asyncio.Event()
            watcher = asyncio.create_task(watch_rollout(c, "app=web", done, started))
            await started.wait()
            await update_with_retry(c, "Deployment", "web",
                                    lambda d: setattr(d.spec.template.spec.containers[0], "image", "v2"))
            deadline = time.monotonic() + 30
            while not watcher.done():
                assert time.monotonic() < deadline, "rollout did not finish"
                await agents.tick()
                await asyncio.sleep(0.1)
            seen_most, seen_fewest = await watcher
            assert seen_most == most, (seen_most, most)
            floor = replicas - (unavailable if isinstance(unavailable, int) else int(unavailable.rstrip("%")) * replicas // 100)
            assert seen_fewest >= floor, (seen_fewest, floor)
    run(scenario())


def test_terminating_pods_on_a_node_that_is_not_ready_are_force_deleted(apiserver, controller_manager):
    """Pod GC, as upstream's: a terminating pod on a NotReady node (no kubelet will finish it) and
    a pod bound to a node that no longer exists are deleted; a terminating pod on a Ready node
    is left to its kubelet."""
    async def scenario():
        async with apiserver.client() as c:
            agents = NodeAgents(c, ["node-a", "node-b", "node-c"])
            await agents.register(agents.alive)
            await c.create(deployment("web", replicas=6))

            async def six_ready():
                pods = await active_pods(c)
                return len(pods) == 6 and all(p.status.pod_ip for p in pods) and \
                    {p.spec.node_name for p in pods} == {"node-a", "node-b", "node-c"}

            await agents.run_until(six_ready)
            pods = await active_pods(c)
            on = {n: [p.metadata.name for p in pods if p.spec.node_name == n] for n in ("node-a", "node-b", "node-c")}
            agents.finish_deletions = False  # node-a's kubelet is slow to finish: its pod stays terminating
            agents.alive.discard("node-b")  # node-b goes silent

            async def b_not_ready():
                return (await c.get("Node", "node-b")).status.conditions[0].status == "Unknown"

            await agents.run_until(b_not_ready)
            for name in (on["node-a"][0], on["node-b"][0]):
                await c.delete("Pod", name)  # graceful: a deletionTimestamp, the kubelet would finish
            agents.alive.discard("node-c")
            await c.delete("Node", "node-c")  # its pods are bound to a node that is gone

            async def collected():
                names = {p.metadata.name for p in (await c.list("Pod"))[0]}
                return on["node-b"][0] not in names and not set(on["node-c"]) & names

            await agents.run_until(collected)
            left = {p.metadata.name: p for p in (await c.list("Pod"))[0]}
            assert left[on["node-a"][0]].metadata.deletion_timestamp  # Ready node: left to its kubelet
            assert on["node-b"][1] in left and not left[on["node-b"][1]].metadata.deletion_timestamp  # not terminating: kept
    run(scenario())
