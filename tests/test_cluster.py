"""`svclab up/down/clean/exec` end to end: Mininet nodes, kubelets, pods as namespaces, DNS.

Each test cluster gets its own name (so they never touch each other or a
user's cluster) and its own state root under pytest's tmp_path.
"""

from __future__ import annotations

import json
import os
import random
import signal
import string
import subprocess
import sys
import time
from pathlib import Path

import pytest

from testbed.node import cgroups
from tests.conftest import REPO

pytestmark = pytest.mark.cluster

SEED = str(REPO / "scenarios/manifests/seed")


def cluster_name() -> str:
    return "t" + "".join(random.choices(string.ascii_lowercase, k=5))


class LabCluster:
    def __init__(self, root: Path, name: str) -> None:
        self.root, self.name = root, name

    def svclab(self, *args: str, input: str | None = None, timeout: float = 120, check: bool = False):
        result = subprocess.run(
            [sys.executable, "-m", "testbed", "--state-root", str(self.root), "--name", self.name, *args],
            input=input, capture_output=True, text=True, cwd=REPO, timeout=timeout,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"svclab {' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
        return result

    def up(self, *args: str) -> subprocess.CompletedProcess:
        return self.svclab("up", "--detach", *args, check=True, timeout=180)

    def json(self, *args: str):
        return json.loads(self.svclab("get", *args, "-o", "json", check=True).stdout)

    def exec(self, target: str, *cmd: str, input: str | None = None, timeout: float = 30):
        return self.svclab("exec", target, "--", *cmd, input=input, timeout=timeout)

    @property
    def state(self) -> Path:
        return self.root / self.name


def starttime(pid: int) -> int | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] == "Z" else int(fields[19])


def cluster_processes(name: str) -> dict[int, tuple[int, str]]:
    """Every process inside one of the cluster's network namespaces now (nodes, router, client,
    pods): pid -> (start time, argv). Taken while the cluster runs, it tells after `down` which
    of them are still there, pod commands included (they run as `nobody` under their own argv).
    By pid and start time, not by namespace inode: the kernel reuses those for other clusters'
    namespaces as soon as ours are gone."""
    inodes = set()
    if os.path.isdir("/run/netns"):
        for n in os.listdir("/run/netns"):
            if n.startswith(f"{name}-"):
                try:
                    inodes.add(os.stat(f"/run/netns/{n}").st_ino)
                except OSError:
                    pass
    found = {}
    for pid in (int(p) for p in os.listdir("/proc") if p.isdigit()):
        try:
            link = os.readlink(f"/proc/{pid}/ns/net")
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        started = starttime(pid)
        if link.startswith("net:[") and int(link[5:-1]) in inodes and started is not None:
            found[pid] = (started, argv)
    return found


def still_running(processes: dict[int, tuple[int, str]]) -> list[str]:
    return [f"{pid} {argv}" for pid, (started, argv) in processes.items() if starttime(pid) == started]


def leftovers(name: str, state: Path | None = None, processes: dict[int, tuple[int, str]] | None = None) -> list[str]:
    """What of cluster `name` is still on the machine: namespaces, bridges, interfaces, netns
    mounts, /etc/netns/<cluster>-pod-* (pods' resolv.conf), processes by name or state path,
    and those of `processes` (cluster_processes() taken while it ran) still running."""
    out = [f"netns {n}" for n in os.listdir("/run/netns") if n.startswith(f"{name}-")] if os.path.isdir("/run/netns") else []
    bridges = subprocess.run(["ovs-vsctl", "list-br"], capture_output=True, text=True).stdout.split()
    out += [f"bridge {b}" for b in bridges if b.startswith(f"{name}-")]
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    out += [f"link {line.split(':')[1].strip()}" for line in links.splitlines() if f" {name}-" in line]
    mounts = Path("/proc/mounts").read_text()
    out += [f"mount {line.split()[1]}" for line in mounts.splitlines() if f"/run/netns/{name}-" in line]
    if os.path.isdir("/etc/netns"):
        out += [f"/etc/netns/{n}" for n in os.listdir("/etc/netns") if n.startswith(f"{name}-")]
    for pattern in [f"mininet:{name}-"] + ([str(state)] if state else []):
        procs = subprocess.run(["pgrep", "-af", pattern], capture_output=True, text=True).stdout
        out += [f"process {p}" for p in procs.splitlines() if "pgrep" not in p]
    out += [f"process that ran in the cluster's namespaces {p}" for p in still_running(processes or {})]
    return out


def down_and_check(cluster: "LabCluster") -> None:
    """`svclab down`, then what it left (before any `clean`, which would hide a leak of down's);
    if anything is left, clean it up anyway (other tests share the machine) and fail."""
    processes = cluster_processes(cluster.name)
    cluster.svclab("down", timeout=120)
    left = leftovers(cluster.name, cluster.state, processes)
    if left:
        cluster.svclab("clean", timeout=120)
    assert not left, left


@pytest.fixture
def make_cluster(tmp_path):
    clusters: list[LabCluster] = []

    def make(name: str | None = None) -> LabCluster:
        cluster = LabCluster(tmp_path / "state", name or cluster_name())
        clusters.append(cluster)
        return cluster

    yield make
    for cluster in clusters:
        down_and_check(cluster)


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """One 2-node cluster for the tests that need no cluster of their own: the seed Deployment
    (3 pods) and its ClusterIP Service. The tests that change it put it back."""
    cluster = LabCluster(tmp_path_factory.mktemp("cl") / "state", cluster_name())
    config = tmp_path_factory.mktemp("clconf") / "lab.yaml"
    config.write_text(f"name: {cluster.name}\nnodes: 2\nnodeMonitorGracePeriod: 3s\n"
                      "kubeProxy: {minSyncPeriod: 100ms}\n")
    try:
        cluster.up("--config", str(config), "-f", f"{SEED}/frontend-deployment.yaml",
                   "-f", f"{SEED}/service-clusterip.yaml")
        yield cluster
    finally:
        down_and_check(cluster)


def pods_by_name(cluster: LabCluster, namespace: str = "default") -> dict:
    return {p["metadata"]["name"]: p for p in cluster.json("pods", "-n", namespace)["items"]}


def test_up_runs_the_seed_deployment_on_real_namespaces(make_cluster):
    c = make_cluster()
    out = c.up("-f", f"{SEED}/frontend-deployment.yaml", "-f", f"{SEED}/service-nodeport.yaml")
    assert "nodes Ready: 3/3" in out.stderr and "pods Ready" in out.stderr

    nodes = {n["metadata"]["name"]: n for n in c.json("nodes")["items"]}
    assert sorted(nodes) == ["node1", "node2", "node3"]
    ips = {name: next(a["address"] for a in n["status"]["addresses"] if a["type"] == "InternalIP")
           for name, n in nodes.items()}
    assert ips == {"node1": "172.18.0.2", "node2": "172.18.0.3", "node3": "172.18.0.4"}

    pods = {k: p for k, p in pods_by_name(c).items() if k.startswith("frontend-")}
    assert len(pods) == 3
    import ipaddress
    for pod in pods.values():
        cidr = ipaddress.ip_network(nodes[pod["spec"]["nodeName"]]["spec"]["podCIDR"])
        assert ipaddress.ip_address(pod["status"]["podIP"]) in cidr
        assert pod["status"]["phase"] == "Running"

    # pod to pod across nodes: plain routing, the client address is the other pod's
    names = sorted(pods)
    a, b = pods[names[0]], pods[names[1]]
    r = c.exec(names[0], "curl", "-s", "--max-time", "5", f"http://{b['status']['podIP']}:8080/")
    assert r.returncode == 0, r.stderr
    answer = json.loads(r.stdout)
    assert answer["pod"] == names[1] and answer["podIP"] == b["status"]["podIP"]
    assert answer["node"] == b["spec"]["nodeName"]
    assert answer["client"].split(":")[0] == a["status"]["podIP"]

    # the client reaches a pod only through the testbed's own router (nodes route pod CIDRs)
    r = c.exec("node1", "curl", "-s", "--max-time", "5", f"http://{a['status']['podIP']}:8080/")
    assert json.loads(r.stdout)["pod"] == names[0]

    # resolv.conf of a pod, as kubelet writes it
    r = c.exec(names[0], "cat", "/etc/resolv.conf")
    assert "search default.svc.cluster.local svc.cluster.local cluster.local" in r.stdout
    assert "nameserver 10.96.0.10" in r.stdout and "options ndots:5" in r.stdout


def test_exec_passes_stdin_stdout_and_exit_code(lab):
    c = lab
    r = c.exec("node1", "sh", "-c", "cat; echo to-stderr >&2; exit 7", input="hello\n")
    assert (r.returncode, r.stdout, r.stderr.strip()) == (7, "hello\n", "to-stderr")
    r = c.exec("client", "ip", "-o", "-4", "addr", "show", "dev", "eth0")
    assert "203.0.113.2/24" in r.stdout
    r = c.exec("nosuchpod", "true")
    assert r.returncode == 1 and 'pods "nosuchpod" not found' in r.stderr


def test_dns_answers_services_headless_srv_and_nxdomain(lab):
    c = lab
    c.svclab("apply", "-f", "-", check=True, input="""
apiVersion: v1
kind: Service
metadata: {name: frontend-headless}
spec:
  clusterIP: None
  selector: {app: frontend}
  ports: [{name: http, port: 80, targetPort: 8080}]
""")
    dns_pods = [p for p in pods_by_name(c, "kube-system").values() if p["metadata"]["name"].startswith("coredns-")]
    assert len(dns_pods) == 2
    server = dns_pods[0]["status"]["podIP"]
    svc = c.json("svc", "frontend-service")
    pod_ips = sorted(p["status"]["podIP"] for n, p in pods_by_name(c).items() if n.startswith("frontend-"))

    def dig(name: str, qtype: str = "A", tcp: bool = False) -> subprocess.CompletedProcess:
        return c.exec("node1", sys.executable, "-c", DIG, server, name, qtype, "tcp" if tcp else "udp")

    r = dig("frontend-service.default.svc.cluster.local")
    assert json.loads(r.stdout) == {"rcode": "NOERROR", "answers": [svc["spec"]["clusterIP"]]}
    r = dig("frontend-service.default.svc.cluster.local", tcp=True)
    assert json.loads(r.stdout)["answers"] == [svc["spec"]["clusterIP"]]
    deadline = time.monotonic() + 10  # the records follow the API (the headless Service was just applied)
    while sorted(json.loads(dig("frontend-headless.default.svc.cluster.local").stdout)["answers"]) != pod_ips:
        assert time.monotonic() < deadline, dig("frontend-headless.default.svc.cluster.local").stdout
        time.sleep(0.2)
    r = dig("_http._tcp.frontend-headless.default.svc.cluster.local", "SRV")
    assert json.loads(r.stdout)["answers"] == ["0 100 80 frontend-headless.default.svc.cluster.local."]
    r = dig("frontend-service.default.svc.cluster.local", "AAAA")
    assert json.loads(r.stdout) == {"rcode": "NOERROR", "answers": []}
    r = dig("nope.default.svc.cluster.local")
    assert json.loads(r.stdout)["rcode"] == "NXDOMAIN"
    r = dig("kubernetes.default.svc.cluster.local")
    assert json.loads(r.stdout)["answers"] == ["10.96.0.1"]
    r = dig("example.com")
    assert json.loads(r.stdout)["rcode"] == "NXDOMAIN"  # nothing is forwarded outside
    c.svclab("delete", "svc", "frontend-headless", check=True)


DIG = """
import json, socket, struct, sys
from dnslib import DNSRecord, QTYPE, RCODE
server, name, qtype, proto = sys.argv[1:5]
q = DNSRecord.question(name, qtype).pack()
if proto == "tcp":
    s = socket.create_connection((server, 53), timeout=3)
    s.sendall(struct.pack("!H", len(q)) + q)
    size = struct.unpack("!H", s.recv(2))[0]
    data = b""
    while len(data) < size:
        data += s.recv(size - len(data))
else:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(3)
    s.sendto(q, (server, 53))
    data = s.recv(4096)
r = DNSRecord.parse(data)
print(json.dumps({"rcode": RCODE[r.header.rcode], "answers": [str(rr.rdata) for rr in r.rr]}))
"""


def frontend(cluster: LabCluster) -> dict:
    """The frontend pods that are not terminating, by name."""
    return {k: p for k, p in pods_by_name(cluster).items()
            if k.startswith("frontend-") and not p["metadata"].get("deletionTimestamp")}


def wait_frontend_ready(cluster: LabCluster, n: int = 3, timeout: float = 30) -> dict:
    """Until n frontend pods are Running and Ready and all n are the Service's ready endpoints."""
    deadline = time.monotonic() + timeout
    while True:
        pods = frontend(cluster)
        ready = {p["status"].get("podIP") for p in pods.values()
                 if any(x["type"] == "Ready" and x["status"] == "True" for x in p["status"].get("conditions", []))}
        slices = cluster.json("endpointslices", "-l", "kubernetes.io/service-name=frontend-service")["items"]
        endpoints = {a for s in slices for e in s.get("endpoints", []) if e["conditions"].get("ready")
                     for a in e["addresses"]}
        if len(pods) == n and len(ready) == n and endpoints == ready:
            return pods
        assert time.monotonic() < deadline, (sorted(pods), ready, endpoints)
        time.sleep(0.2)


def test_deleted_pod_namespace_and_files_go_and_the_pod_is_replaced(lab):
    """The kubelet removes a deleted pod's namespace, veth and /etc/netns directory (how fast:
    bench/cluster.py, goal 1 s); the Deployment replaces the pod."""
    c = lab
    pods = wait_frontend_ready(c)
    victim = sorted(pods)[0]
    uid = pods[victim]["metadata"]["uid"]
    netns = f"{c.name}-pod-{uid.replace('-', '')[:12]}"
    files = [f"/run/netns/{netns}", f"/etc/netns/{netns}"]
    assert all(os.path.exists(f) for f in files)
    c.svclab("delete", "pod", victim, check=True)
    deadline = time.monotonic() + 10
    while any(os.path.exists(f) for f in files):
        assert time.monotonic() < deadline, [f for f in files if os.path.exists(f)]
        time.sleep(0.02)
    assert victim not in wait_frontend_ready(c)  # the Deployment replaced it



COMMAND_POD = """
apiVersion: v1
kind: Pod
metadata: {name: sleeper}
spec:
  containers: [{name: c, image: busybox, command: [sleep, "600"]}]
"""


def wait_running(cluster: LabCluster, name: str, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        pod = pods_by_name(cluster).get(name, {})
        if pod.get("status", {}).get("phase") == "Running":
            return pod
        assert time.monotonic() < deadline, pod
        time.sleep(0.2)


def test_two_clusters_side_by_side_and_clean_after_kill_9(make_cluster):
    a, b = make_cluster(), make_cluster()
    a.up("--nodes", "1", "-f", f"{SEED}/frontend-deployment.yaml")
    b.up("--nodes", "1", "-f", f"{SEED}/frontend-deployment.yaml")
    a.svclab("apply", "-f", "-", input=COMMAND_POD, check=True)  # a pod command: its own process, as nobody
    wait_running(a, "sleeper")
    processes = cluster_processes(a.name)
    assert any("sleep 600" in argv for _, argv in processes.values())
    table = json.loads((a.state / "processes.json").read_text())
    for name in ["up"] + [n for n in table if n != "up"]:  # the supervisor first: nothing restarts
        try:
            os.kill(table[name]["pid"], signal.SIGKILL)
        except (KeyError, ProcessLookupError):
            pass
    time.sleep(0.5)
    assert any("sleep 600" in p for p in still_running(processes))  # the pod's command outlived its kubelet
    assert leftovers(a.name, a.state, processes)  # kill -9 left things behind ...
    groups = cgroups.find_cluster_groups(a.name)
    assert groups and any(cgroups.processes(pod) for g in groups for pod in g.iterdir() if pod.is_dir())
    r = a.svclab("clean", check=True)
    assert "removed" in r.stdout
    left = leftovers(a.name, a.state, processes)
    assert not left, left  # ... and clean removed all of it, the pod's command too
    assert cgroups.find_cluster_groups(a.name) == [], groups  # and the pods' cgroups
    assert not a.state.exists()
    # the other cluster still works
    pod = next(p for k, p in pods_by_name(b).items() if k.startswith("frontend-"))
    r = b.exec("node1", "curl", "-s", "--max-time", "5", f"http://{pod['status']['podIP']}:8080/")
    assert json.loads(r.stdout)["pod"] == pod["metadata"]["name"]
    down_and_check(b)


def test_custom_subnets_from_a_config_file(make_cluster, tmp_path):
    c = make_cluster()
    config = tmp_path / "lab.yaml"
    config.write_text(f"""
name: {c.name}
nodes: 2
networking:
  nodeSubnet: 192.168.0.0/24
  podSubnet: 10.50.0.0/16
  serviceSubnet: 172.30.0.0/16
  externalSubnet: 198.51.100.0/24
  loadBalancerPool: 198.51.100.100-198.51.100.150
""")
    c.up("--config", str(config), "-f", f"{SEED}/frontend-deployment.yaml", "-f", f"{SEED}/service-clusterip.yaml")
    svc = c.json("svc", "frontend-service")
    assert svc["spec"]["clusterIP"].startswith("172.30.")
    dns = c.json("svc", "kube-dns", "-n", "kube-system")
    assert dns["spec"]["clusterIP"] == "172.30.0.10"
    nodes = c.json("nodes")["items"]
    assert {a["address"] for n in nodes for a in n["status"]["addresses"] if a["type"] == "InternalIP"} == \
        {"192.168.0.2", "192.168.0.3"}
    pod = next(p for k, p in pods_by_name(c).items() if k.startswith("frontend-"))
    assert pod["status"]["podIP"].startswith("10.50.")
    r = c.exec("client", "ip", "route")
    assert "192.168.0.0/24 via 198.51.100.1" in r.stdout and "default" not in r.stdout


def test_bad_config_names_the_setting(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("nodes: 2\nnetworking:\n  serviceSubnet: 10.96.0.0/33\n")
    r = subprocess.run([sys.executable, "-m", "testbed", "--state-root", str(tmp_path), "up", "--config", str(config)],
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 1 and "networking.serviceSubnet" in r.stderr
    config.write_text("nodes: 2\nnetwork: {}\n")
    r = subprocess.run([sys.executable, "-m", "testbed", "--state-root", str(tmp_path), "up", "--config", str(config)],
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 1 and "network: unknown setting" in r.stderr


def node_ready(cluster: LabCluster, node: str) -> str:
    n = next(n for n in cluster.json("nodes")["items"] if n["metadata"]["name"] == node)
    return next(x["status"] for x in n["status"]["conditions"] if x["type"] == "Ready")


def ready_endpoints(cluster: LabCluster) -> set[str]:
    slices = cluster.json("endpointslices", "-l", "kubernetes.io/service-name=frontend-service")["items"]
    return {a for s in slices for e in s.get("endpoints", []) if e["conditions"].get("ready") for a in e["addresses"]}


def test_node_failure_takes_its_pods_out_of_the_endpoints_and_gc_finishes_their_deletion(lab):
    """node2's kubelet hangs (SIGSTOP: no heartbeats, its pods' built-in servers stop answering;
    the supervisor sees it alive and leaves it be). The node goes Ready=Unknown and its pods
    leave the endpoints; a pod deleted there meanwhile, which no kubelet will finish, is
    force-deleted by the garbage collector and replaced on node1. Resumed, the kubelet tears
    the deleted pod down."""
    c = lab
    pods = wait_frontend_ready(c)
    on_node2 = {n: p for n, p in pods.items() if p["spec"]["nodeName"] == "node2"}
    assert on_node2
    pid = json.loads((c.state / "processes.json").read_text())["kubelet-node2"]["pid"]
    os.kill(pid, signal.SIGSTOP)
    try:
        deadline = time.monotonic() + 20
        while node_ready(c, "node2") != "Unknown" or ready_endpoints(c) & {p["status"]["podIP"] for p in on_node2.values()}:
            assert time.monotonic() < deadline, (node_ready(c, "node2"), ready_endpoints(c))
            time.sleep(0.3)
        victim = sorted(on_node2)[0]
        netns = f"{c.name}-pod-{on_node2[victim]['metadata']['uid'].replace('-', '')[:12]}"
        c.svclab("delete", "pod", victim, check=True)
        deadline = time.monotonic() + 15
        while victim in pods_by_name(c):  # no kubelet finishes it: the garbage collector does
            assert time.monotonic() < deadline, pods_by_name(c)[victim]["metadata"]
            time.sleep(0.2)
        assert os.path.exists(f"/run/netns/{netns}")  # (its kubelet did not get to it)
        deadline = time.monotonic() + 20
        while True:  # replaced, on the Ready node
            now = frontend(c)
            ready = ready_endpoints(c)
            if len(now) == 3 and len(ready) == 3 - (len(on_node2) - 1):
                break
            assert time.monotonic() < deadline, (sorted(now), ready)
            time.sleep(0.3)
        assert all(p["spec"]["nodeName"] == "node1" for n, p in now.items() if n not in on_node2)
    finally:
        os.kill(pid, signal.SIGCONT)
    deadline = time.monotonic() + 20
    while node_ready(c, "node2") != "True" or os.path.exists(f"/run/netns/{netns}"):
        assert time.monotonic() < deadline, (node_ready(c, "node2"), os.path.exists(f"/run/netns/{netns}"))
        time.sleep(0.3)
    wait_frontend_ready(c)  # node2's remaining pods are endpoints again


def test_container_command_runs_unprivileged_and_readiness_probes_gate_ready(lab):
    c = lab
    c.svclab("apply", "-f", "-", check=True, input="""
apiVersion: v1
kind: Pod
metadata: {name: web, labels: {app: web}}
spec:
  containers:
    - name: web
      image: python
      command: [python3, -m, http.server, "8080"]
      ports: [{containerPort: 8080}]
---
apiVersion: v1
kind: Pod
metadata: {name: never-ready}
spec:
  containers:
    - name: c
      image: anything
      ports: [{containerPort: 8080}]
      readinessProbe:
        httpGet: {path: /, port: 9999}
        periodSeconds: 1
""")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        pods = pods_by_name(c)
        web = pods.get("web", {})
        ready = {n: any(x["type"] == "Ready" and x["status"] == "True" for x in p["status"].get("conditions", []))
                 for n, p in pods.items()}
        if ready.get("web") and pods.get("never-ready", {}).get("status", {}).get("phase") == "Running":
            break
        time.sleep(0.3)
    assert ready["web"] and not ready["never-ready"]
    r = c.exec("node1", "curl", "-s", "--max-time", "5", "-o", "/dev/null", "-w", "%{http_code}",
               f"http://{web['status']['podIP']}:8080/")
    assert r.stdout == "200"  # (web stays: `down` must stop its command, the module's leak check says)
    # the command runs as nobody (it cannot read the cluster's token): the owner of the
    # process that listens on 8080 in the pod's namespace
    r = c.exec("web", "sh", "-c", "pid=$(ss -Hltnp 'sport = :8080' | grep -o 'pid=[0-9]*' | head -1 | cut -d= -f2);"
                                  " stat -c %U /proc/$pid")
    assert r.stdout.strip() == "nobody", (r.stdout, r.stderr)
    time.sleep(2)  # still not ready after more probes
    pod = pods_by_name(c)["never-ready"]
    assert not any(x["type"] == "Ready" and x["status"] == "True" for x in pod["status"]["conditions"])


ROLLING = """
apiVersion: apps/v1
kind: Deployment
metadata: {{name: roll}}
spec:
  replicas: 4
  strategy: {{type: RollingUpdate, rollingUpdate: {{maxSurge: 1, maxUnavailable: 0}}}}
  selector: {{matchLabels: {{app: roll}}}}
  template:
    metadata: {{labels: {{app: roll, version: "{version}"}}}}
    spec: {{containers: [{{name: web, image: web, ports: [{{containerPort: 8080}}]}}]}}
"""


def test_rollout_with_the_real_kubelet_stays_within_max_surge_and_max_unavailable(lab):
    """A template change rolled out by the real kubelets (pods started, probed and stopped for
    real): replayed from a watch of every pod event, never more than 4 + maxSurge 1 pods, never
    fewer than 4 ready; the surge is used; at the end every pod is of the new template."""
    import asyncio
    from testbed.client.client import ApiClient
    from testbed.paths import StateDir
    from tests.test_controllers import watch_rollout

    c = lab
    c.svclab("apply", "-f", "-", input=ROLLING.format(version="1"), check=True)

    def settled(version):
        pods = [p for p in pods_by_name(c).values() if p["metadata"].get("labels", {}).get("app") == "roll"]
        return len(pods) == 4 and all(
            p["metadata"]["labels"]["version"] == version and not p["metadata"].get("deletionTimestamp")
            and any(x["type"] == "Ready" and x["status"] == "True" for x in p["status"].get("conditions", []))
            for p in pods)

    deadline = time.monotonic() + 30
    while not settled("1"):
        assert time.monotonic() < deadline
        time.sleep(0.2)

    async def rollout():
        async with ApiClient.for_state_dir(StateDir(c.state)) as client:
            started = asyncio.Event()
            done = lambda active: len(active) == 4 and all(
                p.metadata.labels["version"] == "2" and any(x.type == "Ready" and x.status == "True"
                                                            for x in p.status.conditions) for p in active)
            watcher = asyncio.create_task(watch_rollout(client, "app=roll", done, started))
            await started.wait()
            await asyncio.to_thread(c.svclab, "apply", "-f", "-", input=ROLLING.format(version="2"), check=True)
            return await asyncio.wait_for(watcher, 60)

    most, fewest = asyncio.run(rollout())
    assert (most, fewest) == (5, 4)
    deadline = time.monotonic() + 30
    while not settled("2"):  # the old pods' deletions finished by their kubelets
        assert time.monotonic() < deadline
        time.sleep(0.2)
    c.svclab("delete", "deployment", "roll", check=True)
