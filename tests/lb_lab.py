"""The load balancer tests' cluster and helpers: one 3-node cluster per test module, read-back of the edge switch.

One 3-node cluster serves the module. IP plan: nodes 172.18.0.2-4 (node3 = 172.18.0.4),
client 203.0.113.2 (a second address 203.0.113.3 only in the source-range test), router
203.0.113.1 / 172.18.0.1, the load balancer pool 203.0.113.100-203.0.113.104 (5 IPs, so
exhausting it is cheap). A node "crash" takes the node's port on the nodes bridge down:
the machine drops off the network (nothing in or out) while its namespace, routes and
rules stay as they were, so "the node comes back" is the same machine again.

The switch balances by itself (controller/flows.py): a select group per service port
whose buckets commit each new connection to the cluster's conntrack zone with DNAT to
nodeIP:nodePort. What the tests read back from it: the groups' buckets (which nodes get
new connections), the buckets' packet counters (how many new connections each node was
given: only a connection's first packet passes the group) and the tracker's entries.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from controller import flows
from testbed.client.client import ApiClient
from testbed.cloud.lb_table import Port
from testbed.paths import StateDir
from testbed import naming
from testbed.cluster import cloud_lb
from testbed.scenario.records import Record
from testbed.scenario.traffic import Generator, GeneratorSpec
from tests.conftest import update_with_retry
from testbed.cluster.topo import Names
from tests.test_cluster import LabCluster, cluster_name, down_and_check

NODES = {"node1": "172.18.0.2", "node2": "172.18.0.3", "node3": "172.18.0.4"}
CLIENT = "203.0.113.2"
POOL = [f"203.0.113.{i}" for i in range(100, 105)]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    cluster = LabCluster(tmp_path_factory.mktemp("lb") / "state", cluster_name())
    config = tmp_path_factory.mktemp("lbconf") / "lab.yaml"
    config.write_text(f"name: {cluster.name}\nnodes: 3\nkubeProxy: {{minSyncPeriod: 100ms}}\n"
                      "networking: {loadBalancerPool: 203.0.113.100-203.0.113.104}\n")
    try:
        cluster.up("--config", str(config))
        yield cluster
    finally:
        down_and_check(cluster)
        zone = Names(cluster.name, 0).ct_zone  # `down` flushed the cluster's conntrack zone
        left = subprocess.run(["ovs-appctl", "dpctl/dump-conntrack", f"zone={zone}"], capture_output=True, text=True)
        assert not left.stdout.strip(), left.stdout


# ---------------------------------------------------------------- helpers

def apply(lab: LabCluster, manifest: str) -> None:
    lab.svclab("apply", "-f", "-", input=manifest, check=True)


def delete(lab: LabCluster, kind: str, *names: str) -> None:
    for name in names:
        lab.svclab("delete", kind, name, "--ignore-not-found", check=True)


def deployment(name: str, replicas: int) -> str:
    return f"""apiVersion: apps/v1
kind: Deployment
metadata: {{name: {name}}}
spec:
  replicas: {replicas}
  selector: {{matchLabels: {{app: {name}}}}}
  template:
    metadata: {{labels: {{app: {name}}}}}
    spec: {{containers: [{{name: web, image: nginx, ports: [{{containerPort: 8080}}]}}]}}
"""


def lb_service(name: str, app: str | None = None, extra: str = "") -> str:
    return f"""apiVersion: v1
kind: Service
metadata: {{name: {name}}}
spec:
  type: LoadBalancer
  selector: {{app: {app or name}}}
  ports: [{{port: 80, targetPort: 8080}}]
{extra}"""


def external_ip(lab: LabCluster, name: str, timeout: float = 15) -> str:
    deadline = time.monotonic() + timeout
    while True:
        ingress = lab.json("svc", name).get("status", {}).get("loadBalancer", {}).get("ingress", [])
        if ingress:
            return ingress[0]["ip"]
        if time.monotonic() > deadline:
            raise AssertionError(f"service {name} got no external IP: {lab.svclab('describe', 'svc', name).stdout}")
        time.sleep(0.1)


def table(lab: LabCluster) -> dict:
    """What the cloud-controller publishes right now: external IP -> LoadBalancer."""
    return cloud_lb.published_table(lab.state).by_ip()


def wait_backends(lab: LabCluster, ip: str, want: set[str], timeout: float = 20) -> float:
    """Seconds until the table sends `ip` to exactly `want`."""
    t0 = time.monotonic()
    while True:
        try:
            lb = table(lab).get(ip)
        except OSError:  # the cloud-controller is (re)starting
            lb = None
        if lb is not None and set(lb.backends) == want:
            return time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"{ip}: backends {lb and lb.backends}, want {sorted(want)}")
        time.sleep(0.05)


def edge_flows(lab: LabCluster) -> str:
    return subprocess.run(["ovs-ofctl", "-O", "OpenFlow13", "dump-flows", f"{lab.name}-edge"],
                          capture_output=True, text=True, check=True).stdout


def edge_groups(lab: LabCluster) -> str:
    return subprocess.run(["ovs-ofctl", "-O", "OpenFlow13", "dump-groups", f"{lab.name}-edge"],
                          capture_output=True, text=True, check=True).stdout


def group_id(ip: str) -> int:
    return flows.group_id(ip, Port("TCP", 80, 0))


def switch_backends(lab: LabCluster, ip: str) -> list[tuple[str, int]]:
    """(node, nodePort) of each bucket of ip:80's group, read from the switch."""
    return cloud_lb.group_buckets(f"{lab.name}-edge").get(group_id(ip), [])


def wait_switch(lab: LabCluster, ip: str, want: set[str], timeout: float = 5) -> float:
    """Seconds until the switch's group for ip:80 has one bucket per node in `want` (and no other)."""
    t0 = time.monotonic()
    while True:
        buckets = switch_backends(lab, ip)
        if sorted(n for n, _ in buckets) == sorted(want):
            return time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"{ip}: the switch's buckets are {buckets}, want {sorted(want)}")
        time.sleep(0.05)


def connection_nodes(lab: LabCluster, ip: str) -> dict[str, int]:
    """New connections the switch gave each node for ip:80 (its group's bucket counters)."""
    return cloud_lb.group_new_connections(f"{lab.name}-edge", group_id(ip))


def tracked(lab: LabCluster) -> list[str]:
    """The cluster's connections in the switch's tracker (its conntrack zone)."""
    out = subprocess.run(["ovs-appctl", "dpctl/dump-conntrack", f"zone={Names(lab.name, 0).ct_zone}"],
                         capture_output=True, text=True, check=True).stdout
    return out.splitlines()


def tracked_node(lab: LabCluster, client_port: int) -> str:
    """The node the tracker sends the client's connection from client_port to."""
    for line in tracked(lab):
        if f"src={CLIENT}," in line and f"sport={client_port}," in line:
            return re.search(r"reply=\(src=([\d.]+)", line).group(1)
    raise AssertionError(f"no tracked connection from {CLIENT}:{client_port}: {tracked(lab)}")


def curl(lab: LabCluster, url: str, *args: str, timeout: float = 3) -> subprocess.CompletedProcess:
    return lab.exec("client", "curl", "-s", "--max-time", str(timeout), *args, url)


def get_json(lab: LabCluster, url: str, timeout: float = 10) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        r = curl(lab, url)
        if r.returncode == 0 and r.stdout:
            return json.loads(r.stdout)
        if time.monotonic() > deadline:
            raise AssertionError(f"client -> {url}: curl exit {r.returncode}")
        time.sleep(0.2)


def load(lab: LabCluster, url: str, rate: float, duration: float, timeout: float = 1.0) -> Generator:
    """New connections from the client to url at `rate` for `duration` s (a scenario traffic generator), started."""
    spec = GeneratorSpec("load", naming.node_netns(lab.name, "client"), url, rate=rate, stop=duration,
                         timeout=timeout, source="client")
    generator = Generator(spec, time.monotonic() + 0.2, Path(tempfile.mkdtemp(prefix="load-", dir=lab.root)))
    generator.start()
    generator.wait_ready()
    return generator


def load_records(lab: LabCluster, url: str, rate: float, duration: float) -> list[Record]:
    """load(), waited for: its requests."""
    generator = load(lab, url, rate, duration)
    generator.wait()
    return generator.records()


def set_port(lab: LabCluster, node: str, state: str) -> None:
    cloud_lb.node_port_state(lab.name, node, state)


def cordon(lab: LabCluster, node: str, unschedulable: bool) -> None:
    async def change() -> None:
        async with ApiClient.for_state_dir(StateDir(lab.state)) as client:
            await update_with_retry(client, "Node", node, lambda obj: setattr(obj.spec, "unschedulable", unschedulable))
    asyncio.run(change())


def ready_pods(lab: LabCluster, app: str, count: int, timeout: float = 30) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        pods = [p for p in lab.json("pods", "-l", f"app={app}")["items"] if not p["metadata"].get("deletionTimestamp")
                and any(c["type"] == "Ready" and c["status"] == "True" for c in p["status"].get("conditions", []))]
        if len(pods) == count:
            return pods
        if time.monotonic() > deadline:
            raise AssertionError(f"{len(pods)}/{count} pods of {app} ready")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def web(lab):
    """Deployment web (3 pods, one per node) behind LoadBalancer Service web (Cluster policy), all nodes healthy."""
    apply(lab, deployment("web", 3) + "---\n" + lb_service("web"))
    ready_pods(lab, "web", 3)
    ip = external_ip(lab, "web")
    wait_backends(lab, ip, set(NODES.values()))
    wait_switch(lab, ip, set(NODES.values()))
    return ip


def guard_packets(lab: LabCluster, ip: str) -> int:
    """Packets the switch dropped as not for any load-balanced port of ip (its guard rule)."""
    subprocess.run(["ovs-appctl", "revalidator/wait"], capture_output=True, timeout=10)
    for line in edge_flows(lab).splitlines():
        if f"priority={flows.PRIO_GUARD},ip,nw_dst={ip} " in line:
            return int(re.search(r"n_packets=(\d+)", line).group(1))
    raise AssertionError(f"no guard rule for {ip}: {edge_flows(lab)}")


def arp_answer(lab: LabCluster, ip: str) -> str:
    """The MAC the client learns for ip ('' if nobody answers)."""
    lab.exec("client", "ip", "neigh", "flush", "dev", "eth0")
    lab.exec("client", "ping", "-c", "1", "-W", "1", ip)
    out = lab.exec("client", "ip", "neigh", "show", ip).stdout
    m = re.search(r"lladdr (\S+)", out)
    return m.group(1) if m else ""



# Holds two connections to http://IP/; on "a" or "b" from stdin sends one request on that one.
HOLDER = """
import socket, sys
ip = sys.argv[1]
conns = {k: socket.create_connection((ip, 80), timeout=5) for k in "ab"}
print("open", *(conns[k].getsockname()[1] for k in "ab"), flush=True)
for line in sys.stdin:
    s = conns[line.strip()]
    s.sendall(b"GET / HTTP/1.0\\r\\nHost: x\\r\\n\\r\\n")
    data = b""
    while chunk := s.recv(4096):
        data += chunk
    print(data.split(b"\\r\\n\\r\\n", 1)[1].decode().strip(), flush=True)
"""
