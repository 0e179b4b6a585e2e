"""No component dies from one bad object (issue #10, section 2), without root.

The work queue's back-off is checked on its own; then each controller of a real
controller-manager, and a real cloud-controller, is handed one object that makes its
handler raise (the documented hook `svclab.io/fault: handler-error:<component>`,
testbed/fault.py): the process must stay up, keep serving the other objects, log the
bad key with a growing retry count, and serve the bad object once the fault is gone.
Node capacity (the scheduler's Too many pods) and the Deployment controller's burst cap
are tested here too; the kubelet and kube-proxy, which need namespaces, are in
test_robust_nodes.py, and the whole cluster at 800 replicas in test_capacity_cluster.py.
"""

from __future__ import annotations

import asyncio
import re
import time

import pytest

from testbed.api.errors import NotFound
from testbed.client.workqueue import BucketRateLimiter, ControllerRateLimiter, ItemExponentialRateLimiter, WorkQueue
from testbed.fault import FAULT_ANNOTATION
from tests.builders import deployment, node, obj, service
from tests.conftest import Process, run, svclab_command
from tests.test_controllers import NodeAgents, active_pods, update_with_retry

pytestmark = pytest.mark.unit


# ---------------------------------------------------------------- the work queue


def test_item_backoff_doubles_from_5ms_to_1000s_and_forget_resets():
    limiter = ItemExponentialRateLimiter()
    delays = [limiter.when("a") for _ in range(20)]
    assert delays[:4] == [0.005, 0.01, 0.02, 0.04]
    assert all(later == 2 * earlier for earlier, later in zip(delays[:17], delays[1:18]))
    assert delays[-1] == 1000.0 and max(limiter.when("a") for _ in range(100)) == 1000.0
    assert limiter.when("b") == 0.005  # per item
    assert limiter.num_requeues("a") == 120
    limiter.forget("a")
    assert limiter.num_requeues("a") == 0 and limiter.when("a") == 0.005


def test_bucket_allows_a_burst_of_100_then_10_per_second():
    now = [0.0]
    bucket = BucketRateLimiter(clock=lambda: now[0])
    assert [bucket.when(i) for i in range(100)] == [0.0] * 100
    assert bucket.when(100) == pytest.approx(0.1) and bucket.when(101) == pytest.approx(0.2)
    now[0] = 10.0  # refilled
    assert bucket.when(102) == 0.0
    both = ControllerRateLimiter(bucket=BucketRateLimiter(clock=lambda: now[0]))
    assert both.when("k") == 0.005 and both.num_requeues("k") == 1


def test_worker_survives_any_exception_and_retries_with_backoff():
    async def scenario():
        queue = WorkQueue()
        attempts: dict[str, list[float]] = {"bad": [], "good": []}

        async def reconcile(key):
            attempts[key].append(time.monotonic())
            if key == "bad" and len(attempts["bad"]) < 6:
                raise KeyError("boom")

        from testbed.client.workqueue import run_worker
        worker = asyncio.create_task(run_worker("test", queue, reconcile))
        queue.add("bad")
        queue.add("good")
        await asyncio.sleep(0.5)
        assert not worker.done()
        assert len(attempts["good"]) == 1 and len(attempts["bad"]) == 6
        gaps = [b - a for a, b in zip(attempts["bad"], attempts["bad"][1:])]
        assert gaps[-1] >= 0.08 * 0.9 and gaps[-1] > gaps[0]  # 5, 10, 20, 40, 80 ms
        assert queue.num_requeues("bad") == 0  # forgotten once it succeeded
        worker.cancel()
    run(scenario())


# ---------------------------------------------------------------- one bad object per controller


def annotated(message, value: str):
    message.metadata.annotations[FAULT_ANNOTATION] = value
    return message


def retries_logged(log_path, component: str, key: str) -> list[int]:
    """The retry counts the component logged for the key, in order."""
    pattern = re.compile(rf"{re.escape(component)}: error syncing '{re.escape(key)}': .*\(retry (\d+) in")
    return [int(m.group(1)) for m in pattern.finditer(log_path.read_text())]


async def wait_for(predicate, timeout=15.0, agents=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if agents is not None:
            await agents.tick()
        if await predicate():
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"condition not met within {timeout}s")


async def retried(proc, component, key, times=3):
    async def check():
        return len(retries_logged(proc.log, component, key)) >= times
    await wait_for(check)
    counts = retries_logged(proc.log, component, key)
    assert counts[:times] == list(range(1, times + 1)), counts
    assert proc.proc.poll() is None, proc.log.read_text()[-2000:]


async def clear_fault(c, kind, name):
    await update_with_retry(c, kind, name, lambda o: o.metadata.annotations.pop(FAULT_ANNOTATION))


def test_deployment_controller_survives_a_deployment_that_raises(apiserver, controller_manager):
    async def scenario():
        async with apiserver.client() as c:
            await c.create(annotated(deployment("bad", replicas=2), "handler-error:deployment"))
            await retried(controller_manager, "deployment", "default/bad")
            await c.create(deployment("good", replicas=2))
            await wait_for(lambda: _count(c, "app=good", 2))
            assert await active_pods(c, "app=bad") == []
            await clear_fault(c, "Deployment", "bad")
            await wait_for(lambda: _count(c, "app=bad", 2))
            assert controller_manager.proc.poll() is None
    run(scenario())


async def _count(c, label, n):
    return len(await active_pods(c, label)) == n


def test_scheduler_survives_a_pod_that_raises(apiserver, controller_manager):
    async def scenario():
        async with apiserver.client() as c:
            agents = NodeAgents(c, ["node-a"])
            await agents.register(agents.alive)
            await c.create(annotated(bare_pod("bad"), "handler-error:scheduler"))
            await retried(controller_manager, "scheduler", "default/bad")
            await c.create(bare_pod("good"))

            async def good_bound():
                return (await c.get("Pod", "good")).spec.node_name == "node-a"
            await wait_for(good_bound, agents=agents)
            assert not (await c.get("Pod", "bad")).spec.node_name
            await clear_fault(c, "Pod", "bad")

            async def bad_bound():
                return (await c.get("Pod", "bad")).spec.node_name == "node-a"
            await wait_for(bad_bound, agents=agents)
    run(scenario())


def bare_pod(name: str):
    return obj({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": {"app": name}},
                "spec": {"containers": [{"name": "web", "image": "nginx", "ports": [{"containerPort": 8080}]}]}})


def test_endpointslice_controller_survives_a_service_that_raises(apiserver, controller_manager):
    async def scenario():
        async with apiserver.client() as c:
            await c.create(annotated(service("bad"), "handler-error:endpointslice"))
            await retried(controller_manager, "endpointslice", "default/bad")
            await c.create(service("good"))

            async def slices_of(name):
                found, _ = await c.list("EndpointSlice", label_selector=f"kubernetes.io/service-name={name}")
                return found
            await wait_for(lambda: _non_empty(slices_of("good")))
            assert await slices_of("bad") == []
            await clear_fault(c, "Service", "bad")
            await wait_for(lambda: _non_empty(slices_of("bad")))
    run(scenario())


async def _non_empty(coro):
    return bool(await coro)


def test_node_ipam_survives_a_node_that_raises(apiserver, controller_manager):
    async def scenario():
        async with apiserver.client() as c:
            await c.create(annotated(node("bad", "172.18.0.2"), "handler-error:nodeipam"))
            await retried(controller_manager, "nodeipam", "bad")
            await c.create(node("good", "172.18.0.3"))

            async def has_cidr(name):
                return bool((await c.get("Node", name)).spec.pod_cidr)
            await wait_for(lambda: has_cidr("good"))
            assert not await has_cidr("bad")
            await clear_fault(c, "Node", "bad")
            await wait_for(lambda: has_cidr("bad"))
    run(scenario())


def test_garbage_collector_survives_a_dependent_that_raises(apiserver, controller_manager):
    """The faulty pod carries its fault from birth (its Deployment's template): annotated
    later, the collector's cache could still hold it unannotated when the owner's deletion
    arrives on the other watch, and collect it (a race this test lost in CI)."""
    async def scenario():
        async with apiserver.client() as c:
            await c.create(deployment("web", replicas=3))
            bad = deployment("bad", replicas=1)
            bad.spec.template.metadata.annotations[FAULT_ANNOTATION] = "handler-error:garbagecollector"
            await c.create(bad)
            await wait_for(lambda: _count(c, "app=web", 3))
            await wait_for(lambda: _count(c, "app=bad", 1))
            victim = (await active_pods(c, "app=bad"))[0].metadata.name
            await c.delete("Deployment", "web")
            await c.delete("Deployment", "bad")

            async def only_victim_left():
                return [p.metadata.name for p in (await c.list("Pod"))[0]] == [victim]
            await wait_for(only_victim_left)
            pattern = re.compile(rf"garbagecollector: error deleting Pod 'default/{victim}': .*\(retry (\d+) in")

            async def retried_thrice():
                return len(pattern.findall(controller_manager.log.read_text())) >= 3
            await wait_for(retried_thrice)
            assert controller_manager.proc.poll() is None
            await clear_fault(c, "Pod", victim)

            async def none_left():
                return not (await c.list("Pod"))[0]
            await wait_for(none_left)
    run(scenario())


def test_cloud_controller_survives_a_service_that_raises(apiserver, tmp_path):
    cloud = Process(svclab_command("--state-dir", str(apiserver.state.path), "cloud-controller",
                                   "--feed-socket", str(tmp_path / "feed.sock")), tmp_path / "cloud.log")
    cloud.start()
    try:
        async def scenario():
            async with apiserver.client() as c:
                await c.create(annotated(service("bad", type="LoadBalancer"), "handler-error:cloud-controller"))
                await retried(cloud, "cloud", "default/bad")
                await c.create(service("good", type="LoadBalancer"))

                async def has_ip(name):
                    return bool((await c.get("Service", name)).status.load_balancer.ingress)
                await wait_for(lambda: has_ip("good"))
                assert not await has_ip("bad")
                await clear_fault(c, "Service", "bad")
                await wait_for(lambda: has_ip("bad"))
                assert cloud.proc.poll() is None
        run(scenario())
    finally:
        cloud.stop()


# ---------------------------------------------------------------- capacity and bursts


def test_pods_beyond_capacity_stay_pending_with_the_schedulers_message(apiserver, controller_manager):
    async def scenario():
        async with apiserver.client() as c:
            agents = NodeAgents(c, ["node-a", "node-b", "node-c"])
            for i, name in enumerate(sorted(agents.alive)):
                n = node(name, f"172.18.0.{i + 2}")
                n.status.capacity["pods"] = n.status.allocatable["pods"] = "2"
                await c.create(n)
            await c.create(deployment("web", replicas=8))

            async def six_bound_two_pending():
                pods = await active_pods(c)
                return len(pods) == 8 and sum(bool(p.spec.node_name) for p in pods) == 6 and all(
                    _scheduled(p) for p in pods if not p.spec.node_name)
            await wait_for(six_bound_two_pending, agents=agents)
            pending = [p for p in await active_pods(c) if not p.spec.node_name]
            for p in pending:
                cond = _scheduled(p)
                assert (cond.status, cond.reason, cond.message) == (
                    "False", "Unschedulable", "0/3 nodes are available: 3 Too many pods.")
                assert p.status.phase == "Pending"
            shown = apiserver.cli("describe", "pod", pending[0].metadata.name)
            assert "PodScheduled" in shown.stdout and "0/3 nodes are available: 3 Too many pods." in shown.stdout
            assert re.search(rf"{pending[0].metadata.name}\s+0/1\s+Pending", apiserver.cli("get", "pods").stdout)
            # room on a node: a pending pod goes there at once (the node event), not after a poll
            n = await c.get("Node", "node-a")
            n.status.allocatable["pods"] = "3"
            await c.update_status(n)

            async def seven_bound():
                return sum(bool(p.spec.node_name) for p in await active_pods(c)) == 7
            await wait_for(seven_bound, timeout=3, agents=agents)
    run(scenario())


def _scheduled(pod):
    return next((x for x in pod.status.conditions if x.type == "PodScheduled" and x.status == "False"), None)


def test_deleting_a_deployment_mid_creation_stops_creation(apiserver, controller_manager):
    """replicas: 100000 with no node: creates come in bursts of at most 500 per sync, and the
    Deployment's deletion stops them at once; the garbage collector then removes every pod."""
    async def scenario():
        async with apiserver.client() as c:
            await c.create(deployment("huge", replicas=100000))
            await wait_for(lambda: _at_least(c, 1000), timeout=30)
            await c.delete("Deployment", "huge")
            at_delete = await _pods(c)
            most = at_delete
            deadline = time.monotonic() + 3
            while time.monotonic() < deadline:
                most = max(most, await _pods(c))
                await asyncio.sleep(0.1)
            assert most <= at_delete + 500, (at_delete, most)

            async def all_collected():
                return await _pods(c) == 0
            await wait_for(all_collected, timeout=60)
            assert controller_manager.proc.poll() is None
    run(scenario())


async def _pods(c) -> int:
    pods, _ = await c.list("Pod")
    return len(pods)


async def _at_least(c, n):
    return await _pods(c) >= n


def test_garbage_collection_of_thousands_of_dependents_completes(apiserver, controller_manager):
    async def scenario():
        async with apiserver.client() as c:
            await c.create(deployment("many", replicas=3000))
            await wait_for(lambda: _exactly(c, 3000), timeout=60)
            started = time.monotonic()
            await c.delete("Deployment", "many")
            await wait_for(lambda: _exactly(c, 0), timeout=60)
            print(f"garbage collection of 3000 pods: {time.monotonic() - started:.1f} s")
            assert controller_manager.proc.poll() is None
            try:
                await c.get("Deployment", "many")
            except NotFound:
                pass
    run(scenario())


async def _exactly(c, n):
    return await _pods(c) == n
