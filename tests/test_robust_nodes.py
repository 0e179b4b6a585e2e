"""The node components keep going past one bad object or a full pod CIDR (issue #10, section 2).

A real API server, and a real kubelet or kube-proxy in a scratch network namespace named
as a cluster's node (`<cluster>-node1`, the cluster name unique to the test), with no
controller-manager: the test gives the node its pod CIDR (a /29: five pod addresses,
10.244.7.2-10.244.7.6) and binds pods with spec.nodeName, as a user can. Traffic stays
inside those namespaces. Teardown stops the component (the kubelet removes its pods) and
deletes the namespaces it named after the cluster.
"""

from __future__ import annotations

import glob
import json
import os
import re
import secrets
import shutil
import subprocess

import pytest

from testbed import naming
from testbed.fault import FAULT_ANNOTATION
from tests.builders import obj, service
from tests.conftest import Process, run, svclab_command
from tests.netns import in_ns
from tests.test_controllers import update_with_retry
from tests.test_robustness import retried, wait_for

pytestmark = pytest.mark.kernel

POD_CIDR = "10.244.7.0/29"
RANGE = "10.244.7.2-10.244.7.6"


class Node:
    """A node namespace of a one-off cluster name and the component processes run in it."""

    def __init__(self, apiserver, tmp_path) -> None:
        self.apiserver = apiserver
        self.tmp_path = tmp_path
        self.cluster = "rb" + secrets.token_hex(3)
        self.netns = naming.node_netns(self.cluster, "node1")
        self.procs: list[Process] = []
        subprocess.run(["ip", "netns", "add", self.netns], check=True)
        subprocess.run(["ip", "-n", self.netns, "link", "set", "lo", "up"], check=True)

    def start(self, component: str, *args: str) -> Process:
        command = svclab_command("--state-dir", str(self.apiserver.state.path), "--name", self.cluster,
                                 component, "--node-name", "node1", *args)
        proc = Process(["ip", "netns", "exec", self.netns, *command], self.tmp_path / f"{component}.log")
        proc.start()
        self.procs.append(proc)
        return proc

    def cleanup(self) -> None:
        for proc in self.procs:
            proc.stop()
        prefix = naming.pod_netns_prefix(self.cluster)
        for path in glob.glob(naming.netns_path(prefix + "*")):
            subprocess.run(["ip", "netns", "del", os.path.basename(path)], capture_output=True)
        for path in glob.glob(f"/etc/netns/{prefix}*"):
            shutil.rmtree(path, ignore_errors=True)
        subprocess.run(["ip", "netns", "del", self.netns], capture_output=True)


@pytest.fixture
def node1(apiserver, tmp_path):
    n = Node(apiserver, tmp_path)
    yield n
    n.cleanup()


def pod(name: str, annotations: dict | None = None):
    return obj({"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": name, "labels": {"app": "web"}, "annotations": annotations or {}},
                "spec": {"nodeName": "node1",
                         "containers": [{"name": "web", "image": "nginx", "ports": [{"containerPort": 8080}]}]}})


async def start_kubelet(c, node1) -> Process:
    kubelet = node1.start("kubelet", "--node-ip", "172.18.0.2")

    async def registered():
        nodes, _ = await c.list("Node")
        return bool(nodes)
    await wait_for(registered)
    await update_with_retry(c, "Node", "node1", lambda n: (setattr(n.spec, "pod_cidr", POD_CIDR),
                                                           n.spec.pod_cidrs.append(POD_CIDR)))
    return kubelet


def condition(p, type_):
    return next((x for x in p.status.conditions if x.type == type_), None)


def running(p) -> bool:
    ready = condition(p, "Ready")
    return p.status.phase == "Running" and ready is not None and ready.status == "True"


def serves(node1, ip: str) -> dict:
    out = in_ns(node1.netns, "curl", "-s", "--max-time", "2", f"http://{ip}:8080/").stdout
    return json.loads(out)


def test_full_pod_cidr_leaves_pods_container_creating_and_the_kubelet_serving(apiserver, node1):
    async def scenario():
        async with apiserver.client() as c:
            kubelet = await start_kubelet(c, node1)

            async def capacity_advertised():
                n = await c.get("Node", "node1")
                return (n.status.capacity.get("pods"), n.status.allocatable.get("pods")) == ("5", "5")
            await wait_for(capacity_advertised)  # min(--max-pods 110, the /29's five addresses)

            for i in range(7):
                await c.create(pod(f"web-{i}"))

            async def five_running_two_waiting():
                pods, _ = await c.list("Pod")
                waiting = [p for p in pods if (cond := condition(p, "PodReadyToStartContainers"))
                           and cond.status == "False"]
                return sum(running(p) for p in pods) == 5 and len(waiting) == 2
            await wait_for(five_running_two_waiting, timeout=20)
            pods, _ = await c.list("Pod")
            waiting = [p for p in pods if not running(p)]
            for p in waiting:
                cond = condition(p, "PodReadyToStartContainers")
                assert (p.status.phase, cond.reason, cond.message) == (
                    "Pending", "FailedCreatePodSandBox",
                    f"Failed to create pod sandbox: failed to allocate for range 0: "
                    f"no IP addresses available in range set: {RANGE}")
                assert re.search(rf"{p.metadata.name}\s+0/1\s+ContainerCreating", apiserver.cli("get", "pods").stdout)
            assert "no IP addresses available" in apiserver.cli("describe", "pod", waiting[0].metadata.name).stdout
            await retried(kubelet, "kubelet", f"default/{waiting[0].metadata.name}", times=2)
            for p in pods:
                if running(p):
                    assert serves(node1, p.status.pod_ip)["pod"] == p.metadata.name

            # two pods go: their addresses free, and the waiting pods start at once (not after a back-off)
            for p in [p for p in pods if running(p)][:2]:
                await c.delete("Pod", p.metadata.name)

            async def waiting_ones_run():
                current = {p.metadata.name: p for p in (await c.list("Pod"))[0]}
                return all(w.metadata.name in current and running(current[w.metadata.name]) for w in waiting)
            await wait_for(waiting_ones_run, timeout=5)
            for w in waiting:
                p = await c.get("Pod", w.metadata.name)
                assert serves(node1, p.status.pod_ip)["pod"] == p.metadata.name
            assert kubelet.proc.poll() is None
    run(scenario())


def test_kubelet_survives_a_pod_that_raises(apiserver, node1):
    async def scenario():
        async with apiserver.client() as c:
            kubelet = await start_kubelet(c, node1)
            await c.create(pod("bad", {FAULT_ANNOTATION: "handler-error:kubelet"}))
            await retried(kubelet, "kubelet", "default/bad")
            await c.create(pod("good"))

            async def good_runs():
                return running(await c.get("Pod", "good"))
            await wait_for(good_runs)
            bad = await c.get("Pod", "bad")
            assert not running(bad) and not bad.status.pod_ip
            await update_with_retry(c, "Pod", "bad", lambda p: p.metadata.annotations.pop(FAULT_ANNOTATION))

            async def bad_runs():
                return running(await c.get("Pod", "bad"))
            await wait_for(bad_runs)
            assert kubelet.proc.poll() is None
    run(scenario())


def test_kube_proxy_survives_a_service_that_raises(apiserver, node1):
    async def scenario():
        async with apiserver.client() as c:
            proxy = node1.start("kube-proxy", "--min-sync-period", "0", "--metrics-address", "127.0.0.1:10249")
            bad = service("bad")
            bad.metadata.annotations[FAULT_ANNOTATION] = "handler-error:kube-proxy"
            bad_ip = (await c.create(bad)).spec.cluster_ip
            pattern = re.compile(r"Service informer: handler failed for \w+ 'default/bad': .*\(retry (\d+) in")

            async def retried_thrice():
                return len(pattern.findall(proxy.log.read_text())) >= 3
            await wait_for(retried_thrice)
            assert [int(n) for n in pattern.findall(proxy.log.read_text())][:3] == [1, 2, 3]
            good_ip = (await c.create(service("good"))).spec.cluster_ip

            def rules() -> str:
                return in_ns(node1.netns, "iptables-save").stdout  # no endpoints: a REJECT in filter

            async def good_programmed():
                return f"{good_ip}/32" in rules()
            await wait_for(good_programmed)
            assert f"{bad_ip}/32" not in rules()
            metrics = in_ns(node1.netns, "curl", "-s", "http://127.0.0.1:10249/metrics").stdout
            count = re.search(r'svclab_informer_handler_errors_total\{kind="Service"\} (\S+)', metrics)
            assert count is not None and float(count.group(1)) >= 3, metrics[-500:]
            await update_with_retry(c, "Service", "bad", lambda s: s.metadata.annotations.pop(FAULT_ANNOTATION))

            async def bad_programmed():
                return f"{bad_ip}/32" in rules()
            await wait_for(bad_programmed)
            assert proxy.proc.poll() is None
    run(scenario())
