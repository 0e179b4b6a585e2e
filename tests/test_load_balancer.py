"""The cloud load balancer end to end: real OVS, real os-ken, real packets from the client namespace.

One 3-node cluster serves the module. IP plan: nodes 172.18.0.2-4 (node3 = 172.18.0.4),
client 203.0.113.2 (a second address 203.0.113.3 only in the source-range test), router
203.0.113.1 / 172.18.0.1, the load balancer pool 203.0.113.100-203.0.113.104 (5 IPs, so
exhausting it is cheap). A node "crash" takes the node's port on the nodes bridge down:
the machine drops off the network (nothing in or out) while its namespace, routes and
rules stay as they were, so "the node comes back" is the same machine again.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import time

import pytest

from testbed.client.client import ApiClient
from testbed.paths import StateDir
from testbed.cluster import cloud_lb
from testbed.cluster.processes import ProcessTable
from tests.conftest import REPO
from tests.test_cluster import LabCluster, cluster_name, leftovers

pytestmark = pytest.mark.cluster

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
        cluster.svclab("down", timeout=120)
        assert not leftovers(cluster.name, cluster.state), leftovers(cluster.name, cluster.state)
        assert not subprocess.run(["pgrep", "-af", f"{cluster.state}"], capture_output=True, text=True).stdout


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


def connection_nodes(lab: LabCluster, ip: str) -> dict[str, int]:
    """Connection rules toward each node for one external IP, read from the switch."""
    out: dict[str, int] = {}
    for line in edge_flows(lab).splitlines():
        m = re.search(rf"nw_dst={re.escape(ip)},.*set_field:([\d.]+)->ip_dst", line)
        if m:
            out[m.group(1)] = out.get(m.group(1), 0) + 1
    return out


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


def load(lab: LabCluster, url: str, rate: float, duration: float, timeout: float = 1.0) -> subprocess.Popen:
    return subprocess.Popen(["ip", "netns", "exec", f"{lab.name}-client", sys.executable, "-m", "bench.loadgen", url,
                             "--rate", str(rate), "--duration", str(duration), "--timeout", str(timeout)],
                            stdout=subprocess.PIPE, text=True, cwd=REPO)


def set_port(lab: LabCluster, node: str, state: str) -> None:
    cloud_lb.node_port_state(lab.name, node, state)


def cordon(lab: LabCluster, node: str, unschedulable: bool) -> None:
    async def change() -> None:
        state = StateDir(lab.state)
        async with ApiClient(state.api_address, state.read_token()) as client:
            obj = await client.get("Node", node)
            obj.spec.unschedulable = unschedulable
            await client.update(obj)
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
    return ip


# ---------------------------------------------------------------- tests

def test_external_ip_reachable_and_connections_spread_over_all_nodes(lab, web):
    assert web == POOL[0]
    out = lab.svclab("get", "svc", "web", check=True).stdout
    assert re.search(rf"web\s+LoadBalancer\s+\S+\s+{re.escape(web)}\s+80:\d+/TCP", out), out
    assert "IPAllocated" in lab.svclab("describe", "svc", "web", check=True).stdout
    pods = {p["metadata"]["name"] for p in ready_pods(lab, "web", 3)}
    assert get_json(lab, f"http://{web}/")["pod"] in pods
    before = connection_nodes(lab, web)
    result = json.loads(load(lab, f"http://{web}/", rate=30, duration=1).communicate(timeout=60)[0])
    assert all(r["ok"] for r in result["requests"]), result
    spread = {n: c - before.get(n, 0) for n, c in connection_nodes(lab, web).items()}
    assert set(spread) == set(NODES.values()) and all(c == 10 for c in spread.values()), spread


def test_client_reaches_no_cluster_ip_and_no_pod_ip(lab, web):
    svc = lab.json("svc", "web")
    pod_ip = ready_pods(lab, "web", 3)[0]["status"]["podIP"]
    for target in (svc["spec"]["clusterIP"], pod_ip):
        assert curl(lab, f"http://{target}/", timeout=1).returncode != 0
    # not even with routes toward the router: ClusterIPs and pod IPs are internal only
    routes = [["ip", "route", "add", net, "via", "203.0.113.1"] for net in ("10.96.0.0/12", "10.244.0.0/16")]
    try:
        for route in routes:
            lab.exec("client", *route)
        for target in (svc["spec"]["clusterIP"], f"{pod_ip}:8080"):
            assert curl(lab, f"http://{target}/", timeout=1).returncode != 0
    finally:
        for route in routes:
            lab.exec("client", "ip", "route", "del", route[3])


def test_pods_and_nodes_reaching_the_external_ip_stay_inside_the_cluster(lab, web):
    """As upstream: kube-proxy has rules for status.loadBalancer.ingress IPs, so a pod or a node
    reaching the external IP is DNATed on its own node and never crosses the load balancer."""
    pods = ready_pods(lab, "web", 3)
    names = {p["metadata"]["name"] for p in pods}
    before = connection_nodes(lab, web)
    for where in (pods[0]["metadata"]["name"], "node2"):
        for _ in range(5):
            r = lab.exec(where, "curl", "-s", "--max-time", "3", f"http://{web}/")
            assert r.returncode == 0 and json.loads(r.stdout)["pod"] in names, r
    assert connection_nodes(lab, web) == before  # no new connection through the switch
    rules = lab.svclab("rules", "node2", check=True).stdout
    assert f"-d {web}/32" in rules and "loadbalancer IP" in rules


def test_second_service_gets_its_own_ip(lab, web):
    apply(lab, lb_service("web2", app="web"))
    try:
        ip2 = external_ip(lab, "web2")
        assert ip2 != web and ip2 in POOL
        wait_backends(lab, ip2, set(NODES.values()))
        assert get_json(lab, f"http://{ip2}/")["pod"].startswith("web-")
        assert get_json(lab, f"http://{web}/")["pod"].startswith("web-")
    finally:
        delete(lab, "svc", "web2")


def test_node_crash_fails_over_within_two_seconds_and_the_node_comes_back(lab):
    # The Service's pods run on node1 and node2 only, so what is measured is the load
    # balancer's failover (not kube-proxy's, which follows the endpoints).
    cordon(lab, "node3", True)
    try:
        apply(lab, deployment("ha", 2) + "---\n" + lb_service("ha"))
        assert {p["spec"]["nodeName"] for p in ready_pods(lab, "ha", 2)} == {"node1", "node2"}
    finally:
        cordon(lab, "node3", False)
    ip = external_ip(lab, "ha")
    try:
        wait_backends(lab, ip, set(NODES.values()))
        run = load(lab, f"http://{ip}/", rate=20, duration=5)
        time.sleep(1.5)
        crash = time.time()
        set_port(lab, "node3", "down")
        detected = wait_backends(lab, ip, {NODES["node1"], NODES["node2"]}, timeout=5)
        assert detected <= 2.0, detected
        result = json.loads(run.communicate(timeout=60)[0])
        after = [r for r in result["requests"] if result["start"] + r["t"] >= crash + 2.0]
        assert after and all(r["ok"] for r in after), [r for r in after if not r["ok"]]
        assert all(r["ok"] for r in result["requests"] if result["start"] + r["t"] < crash)
    finally:
        set_port(lab, "node3", "up")
    wait_backends(lab, ip, set(NODES.values()), timeout=10)  # re-added once healthy again
    before = connection_nodes(lab, ip).get(NODES["node3"], 0)
    for _ in range(6):
        get_json(lab, f"http://{ip}/")
    assert connection_nodes(lab, ip).get(NODES["node3"], 0) - before == 2
    delete(lab, "svc", "ha")
    delete(lab, "deployment", "ha")


def test_local_policy_targets_only_nodes_with_endpoints_and_keeps_the_client_ip(lab):
    apply(lab, deployment("loc", 1) + "---\n" + lb_service("loc", extra="  externalTrafficPolicy: Local\n"))
    try:
        node = ready_pods(lab, "loc", 1)[0]["spec"]["nodeName"]
        ip = external_ip(lab, "loc")
        wait_backends(lab, ip, {NODES[node]})
        answer = get_json(lab, f"http://{ip}/")
        assert answer["client"].split(":")[0] == CLIENT  # not masqueraded anywhere on the way
        result = json.loads(load(lab, f"http://{ip}/", rate=30, duration=1).communicate(timeout=60)[0])
        assert all(r["ok"] for r in result["requests"]), result
        assert set(connection_nodes(lab, ip)) == {NODES[node]}
    finally:
        delete(lab, "svc", "loc")
        delete(lab, "deployment", "loc")


def test_source_ranges_are_enforced_at_the_load_balancer(lab, web):
    apply(lab, lb_service("ranged", app="web", extra="  loadBalancerSourceRanges: [203.0.113.2/32]\n"))
    lab.exec("client", "ip", "addr", "add", "203.0.113.3/24", "dev", "eth0")
    try:
        ip = external_ip(lab, "ranged")
        wait_backends(lab, ip, set(NODES.values()))
        assert get_json(lab, f"http://{ip}/")["pod"].startswith("web-")
        outside = curl(lab, f"http://{ip}/", "--interface", "203.0.113.3", timeout=2)
        assert outside.returncode == 28, outside  # nothing at all comes back: a timeout, not a refusal
        assert curl(lab, f"http://{web}/", "--interface", "203.0.113.3").returncode == 0  # no ranges there
    finally:
        lab.exec("client", "ip", "addr", "del", "203.0.113.3/24", "dev", "eth0")
        delete(lab, "svc", "ranged")


def arp_answer(lab: LabCluster, ip: str) -> str:
    """The MAC the client learns for ip ('' if nobody answers)."""
    lab.exec("client", "ip", "neigh", "flush", "dev", "eth0")
    lab.exec("client", "ping", "-c", "1", "-W", "1", ip)
    out = lab.exec("client", "ip", "neigh", "show", ip).stdout
    m = re.search(r"lladdr (\S+)", out)
    return m.group(1) if m else ""


def test_deleted_service_releases_its_ip_rules_and_arp_answers(lab, web):
    apply(lab, lb_service("gone", app="web"))
    ip = external_ip(lab, "gone")
    wait_backends(lab, ip, set(NODES.values()))
    get_json(lab, f"http://{ip}/")
    assert ip in edge_flows(lab) and arp_answer(lab, ip) == "02:00:cb:00:71:" + f"{int(ip.split('.')[-1]):02x}"
    delete(lab, "svc", "gone")
    deadline = time.monotonic() + 5
    while ip in edge_flows(lab) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert ip not in edge_flows(lab)
    assert ip not in table(lab)
    assert arp_answer(lab, ip) == ""
    assert curl(lab, f"http://{ip}/", timeout=1).returncode != 0
    apply(lab, lb_service("again", app="web"))  # the released IP is free again (lowest first)
    try:
        assert external_ip(lab, "again") == ip
    finally:
        delete(lab, "svc", "again")


def test_pool_exhausted_requested_ip_and_type_change(lab, web):
    names = [f"fill{i}" for i in range(5)]
    try:
        apply(lab, lb_service("want", app="web", extra=f"  loadBalancerIP: {web}\n"))
        deadline = time.monotonic() + 10
        while "is in use by default/web" not in lab.svclab("describe", "svc", "want").stdout:
            assert time.monotonic() < deadline, lab.svclab("describe", "svc", "want").stdout
            time.sleep(0.1)
        assert "<pending>" in lab.svclab("get", "svc", "want").stdout
        delete(lab, "svc", "want")
        apply(lab, "---\n".join(lb_service(n, app="web") for n in names))
        ips = {}
        for n in names[:4]:
            ips[n] = external_ip(lab, n)
        assert sorted(ips.values()) == sorted(set(POOL) - {web})
        deadline = time.monotonic() + 10
        while "no free IP in the pool 203.0.113.100-203.0.113.104" not in lab.svclab("describe", "svc", "fill4").stdout:
            assert time.monotonic() < deadline, lab.svclab("describe", "svc", "fill4").stdout
            time.sleep(0.1)
        assert re.search(r"fill4\s+LoadBalancer\s+\S+\s+<pending>", lab.svclab("get", "svc").stdout)
        # fill0 stops being a LoadBalancer: its IP is released and goes to the pending Service
        apply(lab, lb_service("fill0", app="web").replace("type: LoadBalancer", "type: NodePort"))
        assert external_ip(lab, "fill4") == ips["fill0"]
        assert "IPAllocated" not in lab.svclab("describe", "svc", "fill0").stdout
        assert ips["fill0"] not in {ip for ip, lb in table(lab).items() if lb.service == "default/fill0"}
    finally:
        delete(lab, "svc", "want", *names)


def test_controller_restart_keeps_established_connections_and_relearns(lab, web):
    holder = subprocess.Popen(
        ["ip", "netns", "exec", f"{lab.name}-client", sys.executable, "-c", HOLDER, web],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
    try:
        assert holder.stdout.readline().strip() == "open"
        processes = ProcessTable(lab.state)
        for name in (cloud_lb.LB_CONTROLLER, cloud_lb.CLOUD_CONTROLLER):  # kept down: supervision would restart them
            lab.svclab("stop", name, check=True)
        assert not any(processes.load()[n].alive() for n in (cloud_lb.LB_CONTROLLER, cloud_lb.CLOUD_CONTROLLER))
        holder.stdin.write("a\n")  # no controller at all: the switch still carries the connection
        assert json.loads(holder.stdout.readline())["pod"].startswith("web-")
        for name in (cloud_lb.CLOUD_CONTROLLER, cloud_lb.LB_CONTROLLER):
            lab.svclab("start", name, check=True)
        deadline = time.monotonic() + 20
        while not cloud_lb.connected(f"{lab.name}-edge"):
            assert time.monotonic() < deadline
            time.sleep(0.1)
        wait_backends(lab, web, set(NODES.values()))
        log = lab.state / "logs" / "lb-controller.log"
        deadline = time.monotonic() + 20
        while len(relearned := re.findall(r"switch connected: (\d+) connections re-learned", log.read_text())) < 2:
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        assert int(relearned[-1]) >= 2, relearned  # the restarted app read both connections back from the switch
        holder.stdin.write("b\n")  # opened before the restart, used after it
        assert json.loads(holder.stdout.readline())["pod"].startswith("web-")
        assert lab.json("svc", "web")["status"]["loadBalancer"]["ingress"][0]["ip"] == web
        assert get_json(lab, f"http://{web}/")["pod"].startswith("web-")  # new connections too
        apply(lab, lb_service("after", app="web"))  # the pool re-learned web's IP from its status
        assert external_ip(lab, "after") != web
    finally:
        holder.kill()
        delete(lab, "svc", "after")


# Holds two connections to http://IP/; on "a" or "b" from stdin sends one request on that one.
HOLDER = """
import socket, sys
ip = sys.argv[1]
conns = {k: socket.create_connection((ip, 80), timeout=5) for k in "ab"}
print("open", flush=True)
for line in sys.stdin:
    s = conns[line.strip()]
    s.sendall(b"GET / HTTP/1.0\\r\\nHost: x\\r\\n\\r\\n")
    data = b""
    while chunk := s.recv(4096):
        data += chunk
    print(data.split(b"\\r\\n\\r\\n", 1)[1].decode().strip(), flush=True)
"""
