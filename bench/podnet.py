"""Pod network setup: testbed.node.podnet (netlink, no forks) against forked `ip` commands.

Goal (1,000 pods Ready in 30 s, create->Ready p50 <= 200 ms, on this 2-core machine): the
network part of a pod should cost a few ms, not the ~14 ms of six `ip` forks.

    python -m bench.podnet [--pods 200] [--alt-pods 30] [--no-alternatives] [--record]

In one run, each on its own node namespace with its own cni0:
- podnet: NodeBridge.add_pod() for --pods pods, then remove_pod() for each.
- ip: the same pods with six forked `ip` commands each (netns add; link add veth on cni0;
  link set peer netns+name; addr add; lo+eth0 up in one -batch; route add default), then
  `ip netns del` for each. It skips the bridge-port hairpin flag (a seventh fork), so it is
  the cheaper side of the comparison. Moving the peer into the pod namespace costs an RCU
  grace period (~18 ms here), so a second ip run (with the alternatives) creates the peer in
  the pod namespace directly (5 forks), as podnet does: forks against forks.
- alternatives (--alt-pods pods each): the pod done with pyroute2's own API, with the
  namespaces made and entered by pyroute2 (`netns.create`, `IPRoute(netns=...)`: forks), and
  with podnet's in-thread namespace handling but pyroute2's IPRoute calls (asyncio).
"Gone" is the time from the first removal until the node holds no pod veth any more.
Everything is made under the name prefix pnbench<pid> and removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from dataclasses import dataclass, field
from typing import Callable

from pyroute2 import IPRoute, netns

from bench.common import RESULTS, percentile, print_table
from testbed.node import podnet
from testbed.node.podnet import NETNS_DIR, NodeBridge

PREFIX = f"pnbench{os.getpid()}"


@dataclass
class Result:
    method: str
    pods: int
    add_s: list[float] = field(default_factory=list)
    remove_total: float = 0.0
    gone: float = 0.0

    @property
    def add_total(self) -> float:
        return sum(self.add_s)

    def p(self, q: float) -> float:
        return percentile(self.add_s, q) * 1000


def sh(*args: str, stdin: str | None = None) -> None:
    done = subprocess.run(args, input=stdin, capture_output=True, text=True, timeout=30)
    if done.returncode:
        raise RuntimeError(f"{' '.join(args)}: {done.stderr.strip()}")


def check_ping(pod: str, ip: str) -> None:
    sh("ip", "netns", "exec", pod, "ping", "-c1", "-W1", ip)


def pod_links(ipr: IPRoute) -> int:
    return sum(1 for link in ipr.link("dump") if link.get_attr("IFLA_IFNAME") not in ("lo", "cni0"))


def wait_gone(ipr: IPRoute, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while pod_links(ipr):
        if time.monotonic() > deadline:
            raise RuntimeError("pod veths still there")
        time.sleep(0.005)


def timed_adds(result: Result, add: Callable[[int], None]) -> None:
    for i in range(result.pods):
        start = time.perf_counter()
        add(i)
        result.add_s.append(time.perf_counter() - start)


def pod_ip(subnet: int, i: int) -> str:
    return f"10.244.{subnet}.{i + 2}"


def add_then_remove(res: Result, add: Callable[[int], None], remove: Callable[[int], None], node: str,
                    subnet: int, pods: int, watch: IPRoute) -> None:
    """Time the adds, check the pods reach each other, then time the removes and until their
    veths are gone from the node (seen through `watch`, an IPRoute in the node namespace)."""
    timed_adds(res, add)
    check_ping(f"{node}-p0", pod_ip(subnet, pods - 1))
    start = time.perf_counter()
    for i in range(pods):
        remove(i)
    res.remove_total = time.perf_counter() - start
    wait_gone(watch)
    res.gone = time.perf_counter() - start


def remove_netns(node: str) -> Callable[[int], None]:
    return lambda i: netns.remove(f"{node}-p{i}")


def run_podnet(pods: int) -> Result:
    node, res = f"{PREFIX}-n1", Result("podnet (netlink, in-thread setns)", pods)
    netns.create(node)
    with IPRoute(netns=node) as watch, NodeBridge(node, "10.244.1.0/24") as bridge:
        bridge.ensure()
        add_then_remove(res, lambda i: bridge.add_pod(f"{node}-p{i}", pod_ip(1, i), f"pb{i:08x}"),
                        lambda i: bridge.remove_pod(f"{node}-p{i}"), node, 1, pods, watch)
        bridge.settle()
    return res


def ip_bridge(node: str, subnet: int) -> None:
    netns.create(node)
    sh("ip", "-n", node, "link", "add", "cni0", "type", "bridge")
    sh("ip", "-n", node, "addr", "add", f"10.244.{subnet}.1/24", "dev", "cni0")
    sh("ip", "-n", node, "link", "set", "cni0", "up")


def run_ip(pods: int, move: bool = True) -> Result:
    subnet = 2 if move else 5
    node = f"{PREFIX}-n{subnet}"
    res = Result("ip: 6 forks per pod (baseline)" if move else "ip: 5 forks, peer made in the pod netns", pods)
    ip_bridge(node, subnet)

    def add(i: int) -> None:
        pod, host, peer = f"{node}-p{i}", f"pi{i:08x}", f"pe{i:08x}"
        sh("ip", "netns", "add", pod)
        if move:
            sh("ip", "-n", node, "link", "add", host, "master", "cni0", "up", "type", "veth", "peer", "name", peer)
            sh("ip", "-n", node, "link", "set", peer, "netns", pod, "name", "eth0")
        else:
            sh("ip", "-n", node, "link", "add", host, "master", "cni0", "up", "type", "veth",
               "peer", "name", "eth0", "netns", pod)
        sh("ip", "-n", pod, "addr", "add", f"{pod_ip(subnet, i)}/24", "dev", "eth0")
        sh("ip", "-n", pod, "-batch", "-", stdin="link set lo up\nlink set eth0 up\n")
        sh("ip", "-n", pod, "route", "add", "default", "via", f"10.244.{subnet}.1")

    with IPRoute(netns=node) as watch:
        add_then_remove(res, add, lambda i: sh("ip", "netns", "del", f"{node}-p{i}"), node, subnet, pods, watch)
    return res


def pyroute2_pod(ipr_node: IPRoute, ipr_pod: IPRoute, pod_fd: int, host: str, ip: str, gateway: str) -> None:
    """One pod with pyroute2's IPRoute API: the same requests podnet sends (plus two lookups)."""
    bridge = ipr_node.status.setdefault("cni0", ipr_node.link("get", ifname="cni0")[0]["index"])
    ipr_node.link("add", ifname=host, kind="veth", peer={"ifname": "eth0", "net_ns_fd": pod_fd},
                  master=bridge, state="up")
    ipr_node.brport("set", index=ipr_node.link("get", ifname=host)[0]["index"], mode=1)
    ipr_pod.link("set", index=1, state="up")
    eth0 = ipr_pod.link("get", ifname="eth0")[0]["index"]
    ipr_pod.link("set", index=eth0, state="up")
    ipr_pod.addr("add", index=eth0, address=ip, prefixlen=24)
    ipr_pod.route("add", dst="0.0.0.0/0", gateway=gateway)


def run_pyroute2_forks(pods: int) -> Result:
    node, res = f"{PREFIX}-n3", Result("pyroute2 API, netns.create + IPRoute(netns=) (forks)", pods)
    ip_bridge(node, 3)

    def add(i: int) -> None:
        pod = f"{node}-p{i}"
        netns.create(pod)
        fd = os.open(os.path.join(NETNS_DIR, pod), os.O_RDONLY)
        try:
            with IPRoute(netns=pod) as ipr_pod:
                pyroute2_pod(ipr_node, ipr_pod, fd, f"pf{i:08x}", pod_ip(3, i), "10.244.3.1")
        finally:
            os.close(fd)

    with IPRoute(netns=node) as ipr_node:
        add_then_remove(res, add, remove_netns(node), node, 3, pods, ipr_node)
    return res


def run_pyroute2_setns(pods: int) -> Result:
    node, res = f"{PREFIX}-n4", Result("pyroute2 API (asyncio IPRoute), in-thread setns", pods)
    ip_bridge(node, 4)
    podnet._prepare_netns_dir()

    def add(i: int) -> None:
        pod = f"{node}-p{i}"
        path = os.path.join(NETNS_DIR, pod)
        os.close(os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL, 0))
        with podnet._new_netns(path, pod) as fd:
            with IPRoute() as ipr_pod:  # opened, and used, inside the pod namespace
                pyroute2_pod(ipr_node, ipr_pod, fd, f"ps{i:08x}", pod_ip(4, i), "10.244.4.1")

    with IPRoute(netns=node) as ipr_node:
        add_then_remove(res, add, remove_netns(node), node, 4, pods, ipr_node)
    return res


def cleanup() -> None:
    if not os.path.isdir(NETNS_DIR):
        return
    names = sorted((n for n in os.listdir(NETNS_DIR) if n.startswith(PREFIX + "-")), key=len, reverse=True)
    for name in names:  # pods (longer names) before their nodes
        try:
            netns.remove(name)
        except OSError as e:
            print(f"cleanup: {name}: {e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pods", type=int, default=200)
    parser.add_argument("--alt-pods", type=int, default=30)
    parser.add_argument("--no-alternatives", action="store_true")
    parser.add_argument("--record", action="store_true", help="write bench/results/podnet.json")
    args = parser.parse_args()
    if not 2 <= args.pods <= 250 or not 2 <= args.alt_pods <= 250:
        parser.error("--pods and --alt-pods: 2..250 (one /24 per node)")

    load = os.getloadavg()
    results: list[Result] = []
    try:
        results.append(run_podnet(args.pods))
        results.append(run_ip(args.pods))
        if not args.no_alternatives:
            results.append(run_ip(args.pods, move=False))
            results.append(run_pyroute2_setns(args.alt_pods))
            results.append(run_pyroute2_forks(args.alt_pods))
    finally:
        cleanup()

    ip = results[1]
    rows = []
    for r in results:
        rows.append([
            r.method, str(r.pods), f"{r.p(50):.2f}", f"{r.p(99):.2f}", f"{r.add_total:.3f}",
            f"{ip.p(50) / r.p(50):.2f}x", f"{r.remove_total:.3f}", f"{r.gone:.3f}",
        ])
    print_table(
        f"Pod network setup on one node bridge ({os.cpu_count()} CPUs, load average before "
        f"{load[0]:.2f}; ip = forked `ip` baseline)",
        ["method", "pods", "add p50 ms", "add p99 ms", "add total s", "p50 speed-up vs ip",
         "remove total s", "veths gone s"],
        rows,
    )
    net, ipb = results[0], results[1]
    print(f"\npodnet vs ip, same {net.pods} pods: add total {net.add_total:.3f} s vs {ipb.add_total:.3f} s "
          f"({ipb.add_total / net.add_total:.1f}x faster); remove {net.remove_total:.3f} s vs "
          f"{ipb.remove_total:.3f} s ({ipb.remove_total / net.remove_total:.1f}x)")
    if args.record:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "podnet.json").write_text(json.dumps({
            r.method: {"pods": r.pods, "add_p50_ms": r.p(50), "add_p99_ms": r.p(99), "add_total_s": r.add_total,
                       "remove_total_s": r.remove_total, "gone_s": r.gone} for r in results
        }, indent=2))


if __name__ == "__main__":
    main()
