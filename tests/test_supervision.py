"""Supervision in a real cluster: every component kill -9'd comes back and serves again;
`svclab stop` keeps one down until `svclab start`; `svclab status` reports the components,
the API server and each kube-proxy's last sync; `down` leaves nothing of restarted processes.
(The 3 s goal for a killed component to serve again is measured by bench/supervision.py.)"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

from tests.conftest import REPO
from tests.test_cluster import LabCluster, cluster_name, leftovers

pytestmark = pytest.mark.cluster

SEED = REPO / "scenarios/manifests/seed"
NODE_IPS = {"node1": "172.18.0.2", "node2": "172.18.0.3", "node3": "172.18.0.4"}
COMPONENTS = {"apiserver", "controller-manager", "cloud-controller", "lb-controller",
              *(f"{kind}-{node}" for kind in ("kubelet", "kube-proxy") for node in NODE_IPS)}
LB = """apiVersion: v1
kind: Service
metadata: {name: frontend-lb}
spec: {type: LoadBalancer, selector: {app: frontend}, ports: [{port: 80, targetPort: 8080}]}
"""


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    cluster = LabCluster(tmp_path_factory.mktemp("sup") / "state", cluster_name())
    config = tmp_path_factory.mktemp("supconf") / "lab.yaml"
    config.write_text(f"name: {cluster.name}\nnodes: 3\nkubeProxy: {{minSyncPeriod: 100ms}}\n")
    try:
        cluster.up("--config", str(config), "-f", str(SEED / "frontend-deployment.yaml"),
                   "-f", str(SEED / "service-nodeport.yaml"))
        cluster.svclab("apply", "-f", "-", input=LB, check=True)
        yield cluster
    finally:
        cluster.svclab("down", timeout=120)
        assert not leftovers(cluster.name, cluster.state), leftovers(cluster.name, cluster.state)
        assert not subprocess.run(["pgrep", "-af", f"{cluster.state}"], capture_output=True, text=True).stdout


def status(lab: LabCluster) -> dict:
    return json.loads(lab.svclab("status", "-o", "json", check=True).stdout)


def component(lab: LabCluster, name: str) -> dict:
    return next(c for c in status(lab)["components"] if c["name"] == name)


def wait_for(what: str, check, timeout: float = 20.0, interval: float = 0.1):
    """check()'s first true result, polled until the deadline (AssertionError naming `what` after it)."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def curl(lab: LabCluster, url: str) -> dict | None:
    r = lab.exec("client", "curl", "-s", "-m", "2", url)
    try:
        return json.loads(r.stdout) if r.returncode == 0 else None
    except ValueError:
        return None


def external_ip(lab: LabCluster, service: str) -> str:
    def found():
        ingress = lab.json("svc", service)["status"].get("loadBalancer", {}).get("ingress", [])
        return ingress[0]["ip"] if ingress else ""
    return wait_for(f"an external IP for {service}", found)


def ready_endpoints(lab: LabCluster) -> int:
    slices = lab.json("endpointslices", "-l", "kubernetes.io/service-name=frontend-service")["items"]
    return sum(1 for s in slices for e in s.get("endpoints", []) if e.get("conditions", {}).get("ready"))


def kill9(lab: LabCluster, name: str) -> int:
    pid = json.loads((lab.state / "processes.json").read_text())[name]["pid"]
    os.kill(pid, signal.SIGKILL)
    return pid


def test_status_reports_every_component_the_api_server_and_each_sync(lab):
    report = status(lab)
    assert report["supervisor"] == "running" and report["apiserver"]["healthy"] is True
    assert {c["name"] for c in report["components"]} == COMPONENTS
    for c in report["components"]:
        assert c["state"] == "RUNNING" and c["pid"] and c["restarts"] == 0, c
        if c["component"] == "kube-proxy":
            assert c["sync"]["ok"] is True and c["sync"]["lastUpdated"], c
    table = lab.svclab("status", check=True).stdout.splitlines()
    assert table[0].startswith(f"Cluster {lab.name}: API server healthy")
    assert table[1].split() == ["NODE", "COMPONENT", "STATE", "PID", "RESTARTS", "UPTIME", "LAST", "EXIT",
                                "LAST", "SYNC"]
    assert sum(1 for line in table if line.startswith("node2") and "kube-proxy" in line and "ok at" in line) == 1


def serves_nodeport(lab: LabCluster, node: str = "node1") -> bool:
    return curl(lab, f"http://{NODE_IPS[node]}:30007") is not None


def kube_proxy_serves(lab: LabCluster, node: str) -> bool:
    c = component(lab, f"kube-proxy-{node}")
    return bool(c.get("sync", {}).get("ok")) and serves_nodeport(lab, node)


def kubelet_serves(lab: LabCluster, node: str) -> bool:
    return ready_endpoints(lab) == 3 and serves_nodeport(lab, node)


def controller_manager_serves(lab: LabCluster) -> bool:
    pods = lab.json("pods", "-l", "app=frontend")["items"]
    lab.svclab("delete", "pod", pods[0]["metadata"]["name"], check=True)
    gone = pods[0]["metadata"]["name"]
    return wait_for("a replacement pod", lambda: len([p for p in lab.json("pods", "-l", "app=frontend")["items"]
                                                      if p["metadata"]["name"] != gone]) == 3)


def load_balancer_serves(lab: LabCluster) -> bool:
    return curl(lab, f"http://{external_ip(lab, 'frontend-lb')}/") is not None


@pytest.mark.parametrize("name", ["kube-proxy-node1", "kubelet-node2", "controller-manager", "cloud-controller",
                                  "lb-controller", "apiserver"])
def test_a_killed_component_comes_back_and_serves(lab, name):
    before = component(lab, name)
    old_pid = kill9(lab, name)

    def back():
        c = component(lab, name)
        return c if c["state"] == "RUNNING" and c["pid"] not in (None, old_pid) else None
    after = wait_for(f"{name} restarted", back)
    assert after["restarts"] == before["restarts"] + 1 and after["lastExit"] == "killed by SIGKILL"
    checks = {
        "kube-proxy-node1": lambda: kube_proxy_serves(lab, "node1"),
        "kubelet-node2": lambda: kubelet_serves(lab, "node2"),
        "controller-manager": lambda: controller_manager_serves(lab),
        "cloud-controller": lambda: load_balancer_serves(lab),
        "lb-controller": lambda: load_balancer_serves(lab),
        "apiserver": lambda: lab.svclab("scale", "deployment", "frontend", "--replicas", "3").returncode == 0,
    }
    wait_for(f"{name} serving again", checks[name], timeout=30)
    wait_for("every Service reachable", lambda: serves_nodeport(lab) and load_balancer_serves(lab), timeout=30)


def test_stop_keeps_a_component_down_until_start(lab):
    r = lab.svclab("stop", "kube-proxy", "--node", "node3", check=True)
    assert r.stdout.strip() == "kube-proxy-node3: STOPPED"
    recorded = json.loads((lab.state / "processes.json").read_text())["kube-proxy-node3"]
    deadline = time.monotonic() + 2  # the supervisor ticks every 50 ms: 40 chances to bring it back
    while time.monotonic() < deadline:
        c = component(lab, "kube-proxy-node3")
        assert c["state"] == "STOPPED" and c["pid"] is None, c
        time.sleep(0.2)
    assert not os.path.exists(f"/proc/{recorded['pid']}/stat") or \
        open(f"/proc/{recorded['pid']}/stat").read().rsplit(")", 1)[1].split()[0] == "Z"
    r = lab.svclab("start", "kube-proxy", "--node", "node3", check=True)
    assert r.stdout.startswith("kube-proxy-node3: RUNNING (pid ")
    wait_for("kube-proxy-node3 synced", lambda: kube_proxy_serves(lab, "node3"))


def test_bad_requests_name_the_bad_field_and_change_nothing(lab):
    pids = {c["name"]: c["pid"] for c in status(lab)["components"]}
    r = lab.svclab("stop", "kube-proxy", "--node", "node9")
    assert r.returncode == 1 and "no node 'node9' in this cluster (nodes: node1, node2, node3)" in r.stderr
    r = lab.svclab("restart", "apiserver", "--node", "node1")
    assert r.returncode == 1 and "apiserver runs once per cluster: it takes no --node" in r.stderr
    r = lab.svclab("stop", "etcd")
    assert r.returncode == 2 and "'etcd' is not one of" in r.stderr
    assert {c["name"]: c["pid"] for c in status(lab)["components"]} == pids
