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


def leftovers(name: str, state: Path | None = None) -> list[str]:
    out = [f"netns {n}" for n in os.listdir("/run/netns") if n.startswith(f"{name}-")] if os.path.isdir("/run/netns") else []
    bridges = subprocess.run(["ovs-vsctl", "list-br"], capture_output=True, text=True).stdout.split()
    out += [f"bridge {b}" for b in bridges if b.startswith(f"{name}-")]
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    out += [f"link {line.split(':')[1].strip()}" for line in links.splitlines() if f" {name}-" in line]
    mounts = Path("/proc/mounts").read_text()
    out += [f"mount {line.split()[1]}" for line in mounts.splitlines() if f"/run/netns/{name}-" in line]
    for pattern in [f"mininet:{name}-"] + ([str(state)] if state else []):
        procs = subprocess.run(["pgrep", "-af", pattern], capture_output=True, text=True).stdout
        out += [f"process {p}" for p in procs.splitlines() if "pgrep" not in p]
    return out


@pytest.fixture
def make_cluster(tmp_path):
    clusters: list[LabCluster] = []

    def make(name: str | None = None) -> LabCluster:
        cluster = LabCluster(tmp_path / "state", name or cluster_name())
        clusters.append(cluster)
        return cluster

    yield make
    for cluster in clusters:
        cluster.svclab("down", timeout=120)
        cluster.svclab("clean", timeout=120)
        assert not leftovers(cluster.name, cluster.state), leftovers(cluster.name, cluster.state)


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


def test_exec_passes_stdin_stdout_and_exit_code(make_cluster):
    c = make_cluster()
    c.up("--nodes", "1")
    r = c.exec("node1", "sh", "-c", "cat; echo to-stderr >&2; exit 7", input="hello\n")
    assert (r.returncode, r.stdout, r.stderr.strip()) == (7, "hello\n", "to-stderr")
    r = c.exec("client", "ip", "-o", "-4", "addr", "show", "dev", "eth0")
    assert "203.0.113.2/24" in r.stdout
    r = c.exec("nosuchpod", "true")
    assert r.returncode == 1 and 'pods "nosuchpod" not found' in r.stderr


def test_dns_answers_services_headless_srv_and_nxdomain(make_cluster):
    c = make_cluster()
    headless = """
apiVersion: v1
kind: Service
metadata: {name: frontend-headless}
spec:
  clusterIP: None
  selector: {app: frontend}
  ports: [{name: http, port: 80, targetPort: 8080}]
"""
    seed = Path(SEED)
    manifest = Path(c.root.parent / "headless.yaml")
    manifest.parent.mkdir(parents=True, exist_ok=True)
    manifest.write_text(headless)
    c.up("-f", str(seed / "frontend-deployment.yaml"), "-f", str(seed / "service-clusterip.yaml"),
         "-f", str(manifest))
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
    r = dig("frontend-headless.default.svc.cluster.local")
    assert sorted(json.loads(r.stdout)["answers"]) == pod_ips
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


def test_deleted_pod_namespace_goes_within_a_second(make_cluster):
    c = make_cluster()
    c.up("--nodes", "2", "-f", f"{SEED}/frontend-deployment.yaml")
    pods = {k: p for k, p in pods_by_name(c).items() if k.startswith("frontend-")}
    victim = sorted(pods)[0]
    uid = pods[victim]["metadata"]["uid"]
    netns = f"{c.name}-pod-{uid.replace('-', '')[:12]}"
    assert os.path.exists(f"/run/netns/{netns}")
    started = time.monotonic()
    c.svclab("delete", "pod", victim, check=True)
    while os.path.exists(f"/run/netns/{netns}") and time.monotonic() - started < 5:
        time.sleep(0.02)
    elapsed = time.monotonic() - started
    assert not os.path.exists(f"/run/netns/{netns}")
    assert elapsed < 1.5, elapsed  # includes the CLI's own start-up (~0.4 s)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:  # the Deployment replaces it
        ready = [p for k, p in pods_by_name(c).items() if k.startswith("frontend-") and k != victim
                 and p["status"].get("podIP")]
        if len(ready) == 3:
            break
        time.sleep(0.2)
    assert len(ready) == 3


def test_two_clusters_side_by_side_and_clean_after_kill_9(make_cluster):
    a, b = make_cluster(), make_cluster()
    a.up("--nodes", "1", "-f", f"{SEED}/frontend-deployment.yaml")
    b.up("--nodes", "1", "-f", f"{SEED}/frontend-deployment.yaml")
    table = json.loads((a.state / "processes.json").read_text())
    for entry in table.values():
        try:
            os.kill(entry["pid"], signal.SIGKILL)
        except ProcessLookupError:
            pass
    time.sleep(0.5)
    assert leftovers(a.name, a.state)  # kill -9 left things behind ...
    r = a.svclab("clean", check=True)
    assert "removed" in r.stdout
    assert not leftovers(a.name, a.state), leftovers(a.name, a.state)  # ... and clean removed all of it
    assert not a.state.exists()
    # the other cluster still works
    pod = next(p for k, p in pods_by_name(b).items() if k.startswith("frontend-"))
    r = b.exec("node1", "curl", "-s", "--max-time", "5", f"http://{pod['status']['podIP']}:8080/")
    assert json.loads(r.stdout)["pod"] == pod["metadata"]["name"]
    b.svclab("down", check=True)
    assert not leftovers(b.name, b.state), leftovers(b.name, b.state)


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


def test_node_failure_takes_its_pods_out_of_the_endpoints(make_cluster):
    c = make_cluster()
    c.up("--nodes", "2", "-f", f"{SEED}/frontend-deployment.yaml", "-f", f"{SEED}/service-clusterip.yaml")
    c.svclab("stop", "kubelet", "--node", "node2", check=True)  # kept down: a killed one comes back
    on_node2 = {p["status"]["podIP"] for p in pods_by_name(c).values() if p["spec"].get("nodeName") == "node2"}
    assert on_node2
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        slices = c.json("endpointslices", "-l", "kubernetes.io/service-name=frontend-service")["items"]
        ready = {a for s in slices for e in s.get("endpoints", []) if e["conditions"].get("ready")
                 for a in e["addresses"]}
        node2 = next(n for n in c.json("nodes")["items"] if n["metadata"]["name"] == "node2")
        status = next(x["status"] for x in node2["status"]["conditions"] if x["type"] == "Ready")
        if status == "Unknown" and not ready & on_node2:
            break
        time.sleep(0.3)
    assert status == "Unknown" and not ready & on_node2


def test_container_command_runs_unprivileged_and_readiness_probes_gate_ready(make_cluster):
    c = make_cluster()
    c.up("--nodes", "1")
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
    assert r.stdout == "200"
    # the command runs as nobody (it cannot read the cluster's token): the owner of the
    # process that listens on 8080 in the pod's namespace
    r = c.exec("web", "sh", "-c", "pid=$(ss -Hltnp 'sport = :8080' | grep -o 'pid=[0-9]*' | head -1 | cut -d= -f2);"
                                  " stat -c %U /proc/$pid")
    assert r.stdout.strip() == "nobody", (r.stdout, r.stderr)
    time.sleep(2)  # still not ready after more probes
    pod = pods_by_name(c)["never-ready"]
    assert not any(x["type"] == "Ready" and x["status"] == "True" for x in pod["status"]["conditions"])
