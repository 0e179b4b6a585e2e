"""The kube-proxy tests' cluster and helpers: one 3-node cluster per mode, read-back of a node's rules.

One cluster per mode (iptables, nftables) serves tests/test_kube_proxy.py: 3 nodes, the seed
Deployment (3 frontend pods), minSyncPeriod 100 ms. IP plan: nodes 172.18.0.2-4, client
203.0.113.2 (behind the router 203.0.113.1 / 172.18.0.1), pods 10.244.<n>.0/24.

What the tests read back from a node: `svclab rules`, its kube-proxy's /metrics, and the
kernel's own view (iptables-save -c, nft -j -a): rule counters and handles tell a rule left
alone from one rewritten.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO
from tests.test_cluster import LabCluster, cluster_name, down_and_check

SEED = REPO / "scenarios/manifests/seed"
NODES = ("172.18.0.2", "172.18.0.3", "172.18.0.4")
CLIENT = "203.0.113.2"


@pytest.fixture(scope="module", params=["iptables", "nftables"])
def lab(request, tmp_path_factory):
    cluster = LabCluster(tmp_path_factory.mktemp("kp") / "state", cluster_name())
    cluster.mode = request.param
    cluster.config = tmp_path_factory.mktemp("kpconf") / "lab.yaml"
    cluster.config.write_text(f"name: {cluster.name}\nnodes: 3\n"
                              f"kubeProxy: {{mode: {cluster.mode}, minSyncPeriod: 100ms}}\n")
    try:
        cluster.up("--config", str(cluster.config), "-f", str(SEED / "frontend-deployment.yaml"))
        yield cluster
    finally:
        down_and_check(cluster)


def apply(lab: LabCluster, manifest: str) -> None:
    lab.svclab("apply", "-f", "-", input=manifest, check=True)


def delete(lab: LabCluster, kind: str, name: str) -> None:
    lab.svclab("delete", kind, name, "--ignore-not-found", check=True)


def service(name: str, spec: str) -> str:
    return f"apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec:\n{spec}"


def curl(lab: LabCluster, where: str, url: str, timeout: float = 3) -> subprocess.CompletedProcess:
    return lab.exec(where, "curl", "-s", "--max-time", str(timeout), url)


def get_json(lab: LabCluster, where: str, url: str) -> dict:
    deadline = time.monotonic() + 10  # rules follow the API within min-sync-period
    while True:
        r = curl(lab, where, url)
        if r.returncode == 0 and r.stdout:
            return json.loads(r.stdout)
        if time.monotonic() > deadline:
            raise AssertionError(f"{where} -> {url}: curl exit {r.returncode} {r.stderr}")
        time.sleep(0.2)


def node_run(lab: LabCluster, node: int, *cmd: str) -> str:
    """A command in node<node>'s namespace, without the CLI's start-up (~10 ms, not ~0.4 s)."""
    r = subprocess.run(["ip", "netns", "exec", f"{lab.name}-node{node}", *cmd], capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 0, (cmd, r.stderr)
    return r.stdout


def frontend_pods(lab: LabCluster) -> list[dict]:
    pods = lab.json("pods", "-l", "app=frontend")["items"]
    return [p for p in pods if not p["metadata"].get("deletionTimestamp")]


def wait_ready_pods(lab: LabCluster, n: int) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        slices = lab.json("endpointslices", "-l", "kubernetes.io/service-name=frontend-service")["items"]
        ready = [e for s in slices for e in s.get("endpoints", []) if e["conditions"].get("ready")]
        if len(frontend_pods(lab)) == n and len(ready) == n:
            return
        time.sleep(0.3)
    raise AssertionError(f"frontend did not get back to {n} ready pods")


# Counts answers per pod over N bounded HTTP requests, from inside a namespace.
COUNT = """
import collections, json, socket, sys, urllib.request
url, n = sys.argv[1], int(sys.argv[2])
seen = collections.Counter()
for _ in range(n):
    try:
        seen[json.load(urllib.request.urlopen(url, timeout=3))["pod"]] += 1
    except Exception as exc:
        seen["error:" + type(exc).__name__] += 1
print(json.dumps(seen))
"""


def counts(lab: LabCluster, where: str, url: str, n: int) -> dict[str, int]:
    r = lab.exec(where, sys.executable, "-c", COUNT, url, str(n), timeout=120)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


# One TCP connect from inside a namespace: "connected", or the errno name it failed with.
CONNECT = """
import errno, socket, sys
s = socket.socket()
s.settimeout(float(sys.argv[3]))
try:
    s.connect((sys.argv[1], int(sys.argv[2])))
    print("connected")
except socket.timeout:
    print("timeout")
except OSError as exc:
    print(errno.errorcode.get(exc.errno, str(exc)))
"""


def connect(lab: LabCluster, node: int, ip: str, port: int, timeout: float = 5) -> str:
    return node_run(lab, node, sys.executable, "-c", CONNECT, ip, str(port), str(timeout)).strip()


def udp_echo(lab: LabCluster, app: str, name: str) -> None:
    """Two pods of the built-in workload (it echoes on the UDP ports a pod declares) behind
    Service `name`, UDP port 53000."""
    apply(lab, f"""
apiVersion: apps/v1
kind: Deployment
metadata: {{name: {app}}}
spec:
  replicas: 2
  selector: {{matchLabels: {{app: {app}}}}}
  template:
    metadata: {{labels: {{app: {app}}}}}
    spec:
      containers: [{{name: echo, image: echo, ports: [{{containerPort: 9000, protocol: UDP}}]}}]
""")
    apply(lab, service(name, f"  selector: {{app: {app}}}\n  ports: [{{port: 53000, targetPort: 9000, protocol: UDP}}]\n"))


ECHO_CLIENT = """
import socket, sys, time, pathlib
host, port, flag = sys.argv[1], int(sys.argv[2]), pathlib.Path(sys.argv[3])
s = socket.create_connection((host, port), timeout=5)
s.sendall(b"before\\n"); print(s.recv(100).decode().strip(), flush=True)
flag.write_text("connected")
deadline = time.monotonic() + 60
while flag.read_text() != "go" and time.monotonic() < deadline:
    time.sleep(0.05)
s.sendall(b"after\\n"); print(s.recv(100).decode().strip(), flush=True)
"""


# New connections, one every 50 ms, until the flag file says "stop" (at most 60 s): a JSON
# summary of how many were served and which failed.
NEW_CONNECTIONS = """
import json, pathlib, sys, time, urllib.request
url, flag = sys.argv[1], pathlib.Path(sys.argv[2])
ok, failed, deadline = 0, [], time.monotonic() + 60
flag.write_text("running")
while flag.read_text() != "stop" and time.monotonic() < deadline:
    t = time.monotonic()
    try:
        json.load(urllib.request.urlopen(url, timeout=2))
        ok += 1
    except Exception as exc:
        failed.append([round(time.time(), 3), repr(exc)])
    time.sleep(max(0.0, 0.05 - (time.monotonic() - t)))
print(json.dumps({"ok": ok, "failed": failed}))
"""


UDP_CLIENT = """
import json, pathlib, socket, sys, time
ip, flag = sys.argv[1], pathlib.Path(sys.argv[2])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # one socket: one conntrack entry all along
s.settimeout(0.3)
first, deadline = None, time.monotonic() + 40
while time.monotonic() < deadline:
    s.sendto(b"hi", (ip, 53000))
    try:
        pod = json.loads(s.recv(4096))["pod"]
    except OSError:
        pod = None
    if pod and first is None:
        first = pod
        flag.write_text(first)
        print("first", pod, flush=True)
    elif pod and pod != first:
        print("then", pod, flush=True)
        break
    time.sleep(0.2)
"""


def rules_of(lab: LabCluster, node: int) -> str:
    r = lab.svclab("rules", f"node{node}")
    assert r.returncode == 0, r.stderr
    return r.stdout


def metric_lines(lab: LabCluster, node: int, prefix: str) -> list[str]:
    r = lab.exec(f"node{node}", "curl", "-s", "--max-time", "3", f"http://{NODES[node - 1]}:10249/metrics")
    return [l for l in r.stdout.splitlines() if l.startswith(prefix)]


def programming_count(lab: LabCluster, node: int) -> float:
    count = metric_lines(lab, node, "kubeproxy_network_programming_duration_seconds_count")
    assert len(count) == 1, count
    return float(count[0].split()[1])


def full_syncs(lab: LabCluster, node: int) -> float:
    lines = metric_lines(lab, node, "kubeproxy_sync_full_proxy_rules_total ")
    assert len(lines) == 1, lines
    return float(lines[0].split()[1])


def wait_full_syncs(lab: LabCluster, node: int, want: float, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while full_syncs(lab, node) < want:
        assert time.monotonic() < deadline, (full_syncs(lab, node), want)
        time.sleep(0.1)


def force_full_resync(lab: LabCluster, node: int) -> None:
    """Damage that only the monitor sees, harmless to traffic meanwhile: iptables, the mangle
    canary chain deleted; nftables, mark-for-masquerade flushed. kube-proxy resyncs in full."""
    if lab.mode == "iptables":
        node_run(lab, node, "iptables", "-w", "-t", "mangle", "-X", "KUBE-PROXY-CANARY")
    else:
        node_run(lab, node, "nft", "flush", "chain", "ip", "kube-proxy", "mark-for-masquerade")


def refusals(lab: LabCluster, node: int, name: str) -> int:
    """How often node's kube-proxy has tried a Service and found its rules refused."""
    log = (lab.state / "logs" / f"kube-proxy-node{node}.log").read_text()
    return log.count(f"service {name}: the kernel refused its rules")


def kernel_objects(lab: LabCluster, node: int) -> dict:
    """What a restart must not replace. iptables: the jumps from the built-in chains to
    kube-proxy's, with their packet counters (a rule deleted and inserted again starts at 0),
    and the set of chains. nftables: the handles of the table, of every chain and set (a
    replaced table gets new ones; affinity sets would lose their entries)."""
    if lab.mode == "iptables":
        hooks, chains = {}, set()
        for table in ("nat", "filter"):
            for line in node_run(lab, node, "iptables-save", "-c", "-t", table).splitlines():
                if line.startswith(":"):
                    chains.add((table, line.split()[0][1:]))
                elif line.startswith("[") and " -j KUBE-" in line and line.split()[2] in (
                        "PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"):
                    counter, rule = line.split(" ", 1)
                    hooks[(table, rule)] = int(counter[1:].split(":")[0])
        return {"hooks": hooks, "chains": chains}
    listing = json.loads(node_run(lab, node, "nft", "-j", "-a", "list", "table", "ip", "kube-proxy"))["nftables"]
    handles = {}
    for item in listing:
        for kind in ("table", "chain", "set", "map"):
            if kind in item:
                handles[(kind, item[kind]["name"])] = item[kind]["handle"]
    return {"handles": handles}


def rule_identities(lab: LabCluster, node: int, service: str) -> dict:
    """The rules of one Service as the kernel holds them: iptables, each rule with its packet
    counter; nftables, each rule with its handle. A rule rewritten gets a fresh counter (0) or
    a new handle."""
    if lab.mode == "iptables":
        out = {}
        for line in node_run(lab, node, "iptables-save", "-c", "-t", "nat").splitlines():
            if line.startswith("[") and f'"{service} -> ' in line:
                counter, rule = line.split(" ", 1)
                out[rule] = int(counter[1:].split(":")[0])
        return out
    listing = json.loads(node_run(lab, node, "nft", "-j", "-a", "list", "table", "ip", "kube-proxy"))["nftables"]
    return {json.dumps(item["rule"]["expr"]): item["rule"]["handle"] for item in listing
            if "rule" in item and service + "/" in item["rule"]["chain"]}
