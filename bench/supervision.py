"""Supervision benchmark: how long a kill -9'd component takes to serve again.

Goal (reliability issue): a killed kube-proxy, kubelet, controller-manager, cloud-controller
or lb-controller serves again within 3 s. Per component and run: kill -9 its process, then
measure kill -> the supervisor runs a new process ("back") and kill -> it does its job again
("serving"):

    kube-proxy   its /healthz reports a sync after the kill, and the NodePort answers on its node
    kubelet      the node's pods answer again (their servers are the kubelet's children)
    controller-manager  a pod deleted right after the kill has a replacement
    cloud-controller    its table feed answers again (the load balancer's health checks run)
    lb-controller       the edge bridge is connected again and the external IP answers
    apiserver    a write (a label on the Deployment) succeeds

    PYTHONPATH=. python -m bench.supervision [--runs 3]

The cluster (3 nodes, the seed Deployment with its NodePort Service and a LoadBalancer
Service) is named bs*, lives under a temporary --state-root and is torn down whatever happens.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import string
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Callable

from bench.cluster import svclab, teardown
from bench.common import REPO, RESULTS, percentile, print_table
from testbed import naming
from testbed.client.client import ApiClient
from testbed.cluster import cloud_lb
from testbed.node.podnet import entered_netns
from testbed.paths import StateDir

GOAL_S = 3.0
NODE_IPS = {"node1": "172.18.0.2", "node2": "172.18.0.3", "node3": "172.18.0.4"}
LB = """apiVersion: v1
kind: Service
metadata: {name: frontend-lb}
spec: {type: LoadBalancer, selector: {app: frontend}, ports: [{port: 80, targetPort: 8080}]}
"""


class Lab:
    def __init__(self, root: Path, name: str) -> None:
        self.root, self.name = root, name
        self.state = StateDir(root / name)

    def pid(self, process: str) -> int:
        return json.loads((self.state.path / "processes.json").read_text())[process]["pid"]

    def http(self, host: str, url: str, timeout: float = 1.0) -> dict | None:
        """GET url from inside a host's namespace (client, node1, ...), in this process."""
        try:
            with entered_netns(naming.node_netns(self.name, host)):
                with urllib.request.urlopen(url, timeout=timeout) as answer:
                    return json.load(answer)
        except (OSError, ValueError):
            return None

    def api(self, fn: Callable) -> object:
        async def call():
            async with ApiClient.for_state_dir(self.state) as client:
                return await fn(client)
        try:
            return asyncio.run(asyncio.wait_for(call(), 2))
        except Exception:  # the API server may be the one that is down
            return None


def wait(check: Callable[[], object], timeout: float = 30.0) -> float:
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > timeout:
            return float("inf")
        time.sleep(0.02)
    return time.monotonic()


def external_ip(lab: Lab) -> str:
    async def get(client):
        svc = await client.get("Service", "frontend-lb", "default")
        return svc.status.load_balancer.ingress[0].ip if svc.status.load_balancer.ingress else ""
    deadline = time.monotonic() + 30
    while not (ip := lab.api(get)):
        if time.monotonic() > deadline:
            raise RuntimeError("frontend-lb got no external IP")
        time.sleep(0.1)
    return str(ip)


def serving_check(lab: Lab, process: str, killed_at: float, lb_ip: str) -> Callable[[], object]:
    """What "serving again" means for this component (called after the kill)."""
    _, _, index = process.partition("-node")
    node = f"node{index}" if index else ""
    if process.startswith("kube-proxy"):
        def synced():
            health = lab.http(node, f"http://{NODE_IPS[node]}:10249/healthz")
            fresh = health and health["lastUpdated"] >= time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(killed_at))
            return fresh and lab.http("client", f"http://{NODE_IPS[node]}:30007/")
        return synced
    if process.startswith("kubelet"):
        async def ips_on_node(client):
            pods, _ = await client.list("Pod", "default", label_selector="app=frontend")
            return [p.status.pod_ip for p in pods if p.spec.node_name == node and p.status.pod_ip]
        ips = lab.api(ips_on_node) or []
        return lambda: all(lab.http(node, f"http://{ip}:8080/") for ip in ips)
    if process == "controller-manager":
        return replacement_check(lab)
    if process == "cloud-controller":
        return lambda: _feed_answers(lab)
    if process == "lb-controller":
        return lambda: cloud_lb.connected(f"{lab.name}-edge") and lab.http("client", f"http://{lb_ip}/")
    if process == "apiserver":
        async def write(client):
            d = await client.get("Deployment", "frontend", "default")
            d.metadata.labels["bench"] = str(time.time())
            return await client.update(d)
        return lambda: lab.api(write)
    raise ValueError(process)


def _feed_answers(lab: Lab) -> bool:
    try:
        cloud_lb.published_table(lab.state.path, timeout=0.5)
        return True
    except (OSError, ValueError):
        return False


def replacement_check(lab: Lab) -> Callable[[], object]:
    async def delete_one(client):
        pods, _ = await client.list("Pod", "default", label_selector="app=frontend")
        await client.delete("Pod", pods[0].metadata.name, "default")
        return {p.metadata.name for p in pods}
    before = lab.api(delete_one) or set()

    async def replaced(client):
        pods, _ = await client.list("Pod", "default", label_selector="app=frontend")
        return any(p.metadata.name not in before for p in pods)
    return lambda: lab.api(replaced)


def measure(lab: Lab, process: str, lb_ip: str) -> tuple[float, float]:
    old = lab.pid(process)
    killed_at = time.time()
    t0 = time.monotonic()
    os.kill(old, signal.SIGKILL)
    check = serving_check(lab, process, killed_at, lb_ip)
    back = wait(lambda: lab.pid(process) != old and os.path.exists(f"/proc/{lab.pid(process)}")) - t0
    serving = wait(check) - t0
    wait(lambda: lab.http("client", "http://172.18.0.2:30007/") and lab.http("client", f"http://{lb_ip}/"))
    time.sleep(1)  # settle (slices, health checks) before the next kill
    return back, serving


PROCESSES = ["kube-proxy-node1", "kubelet-node2", "controller-manager", "cloud-controller", "lb-controller",
             "apiserver"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    name = "bs" + "".join(random.choices(string.ascii_lowercase, k=4))
    seed = REPO / "scenarios/manifests/seed"
    with tempfile.TemporaryDirectory(prefix="svclab-bench-") as tmp:
        root = Path(tmp)
        lab = Lab(root, name)
        try:
            up = svclab(root, name, "up", "--detach", "-f", str(seed / "frontend-deployment.yaml"),
                        "-f", str(seed / "service-nodeport.yaml"), timeout=180)
            if up.returncode != 0:
                raise RuntimeError(f"svclab up failed: {up.stderr}")
            (root / "lb.yaml").write_text(LB)
            svclab(root, name, "apply", "-f", str(root / "lb.yaml"))
            lb_ip = external_ip(lab)
            wait(lambda: lab.http("client", f"http://{lb_ip}/"))
            results = {p: [measure(lab, p, lb_ip) for _ in range(args.runs)] for p in PROCESSES}
        finally:
            teardown(root, name)
    report(results)


def report(results: dict[str, list[tuple[float, float]]]) -> None:
    rows = []
    for process, runs in results.items():
        back, serving = [r[0] for r in runs], [r[1] for r in runs]
        verdict = "" if process == "apiserver" else ("PASS" if max(serving) <= GOAL_S else "FAIL")
        rows.append([process, str(len(runs)), f"{percentile(back, 50):.2f}", f"{max(back):.2f}",
                     f"{percentile(serving, 50):.2f}", f"{max(serving):.2f}", verdict])
    print_table(f"kill -9 -> back / serving again (s), goal <= {GOAL_S:.0f} s",
                ["component", "runs", "back p50", "back max", "serving p50", "serving max", "goal"], rows)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "supervision.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
