"""Component and node faults: kill/stop/start a component, crash/recover and freeze/thaw a node.

Components run under the cluster's supervisor (testbed/cluster/supervisor.py); every action
here goes through its control socket, as `svclab stop|start|restart` do: component-kill is a
SIGKILL of the current process (the supervisor brings it back with its back-off), component-stop
keeps it down until component-start. coredns is not a process but the kube-system/coredns
Deployment's pods, which the kubelets serve: kill = its pods' containers killed (pods.py, the
kubelet restarts them), stop = scaled to 0 until start scales it back.

A crashed node is what a power cut leaves: its kubelet and kube-proxy SIGKILLed and kept down,
its pods' processes killed, its links down (the node lifecycle controller marks it NotReady
after the grace period and its pods leave the endpoints), and the kernel state a reboot would
not bring back gone: its Service rules (every mode's) and its conntrack table. Kept, the old
rules would forward the first connections after node-recover to the node's own pod, dead until
its kubelet restarts it, before the new kube-proxy had synced. A frozen node is a paused VM: its
kubelet, kube-proxy and every process they started stopped (SIGSTOP) until thawed.
"""

from __future__ import annotations

import os
import signal
import subprocess
from typing import Any

from testbed.api.v1 import api_pb2 as pb
from testbed.cluster import procfs
from testbed.cluster.processes import ProcessTable
from testbed.cluster.supervisor import COMPONENTS, NODE_COMPONENTS, ask
from testbed.faults import api, links, pods, proxy
from testbed.faults.state import Fault, FaultStore
from testbed.faults.target import FaultError, FaultTarget
from testbed.node import podnet
from testbed.proxy import backends

COREDNS = "coredns"
ALL_COMPONENTS = (*COMPONENTS, COREDNS)
DNS_NAMESPACE, DNS_DEPLOYMENT, DNS_LABELS = "kube-system", "coredns", "k8s-app=kube-dns"
DEFAULT_DNS_REPLICAS = 2  # testbed/addons/dns.yaml


def _check_component(cluster: FaultTarget, component: object, node: object) -> None:
    if component not in ALL_COMPONENTS:
        raise FaultError("component", f"unknown component {component!r} (one of {', '.join(ALL_COMPONENTS)})")
    if node is not None:
        if component not in (*NODE_COMPONENTS, COREDNS):
            raise FaultError("node", f"{component} runs once per cluster: it takes no node")
        cluster.check_node(node)


def _supervisor(cluster: FaultTarget, request: dict[str, Any]) -> dict[str, Any]:
    try:
        answer = ask(cluster.state.path, request)
    except OSError as exc:
        raise FaultError("cluster", f'cluster "{cluster.cluster}" has no running supervisor ({exc})') from None
    if not answer.get("ok"):
        raise FaultError("component", answer.get("error", "the supervisor refused the request"))
    return answer


def _store(cluster: FaultTarget) -> FaultStore:
    return FaultStore(cluster.faults_file)


def _dns_pods(cluster: FaultTarget, node: str | None) -> list[pb.Pod]:
    async def find(client):
        found, _ = await client.list("Pod", DNS_NAMESPACE, label_selector=DNS_LABELS)
        return [p for p in found if not p.metadata.deletion_timestamp and (node is None or p.spec.node_name == node)]
    return api.call(cluster, find)


def component_kill(cluster: FaultTarget, component: str, node: str | None = None) -> Fault:
    """SIGKILL the component (on one node, or all of them); supervision brings it back."""
    _check_component(cluster, component, node)
    if component == COREDNS:
        killed = [pods.pod_kill(cluster, p.metadata.name, DNS_NAMESPACE).params for p in _dns_pods(cluster, node)]
        if not killed:
            raise FaultError("node", f"no coredns pod runs on {node}" if node else "no coredns pod runs")
        return Fault("component-kill", {"component": component, "node": node, "killed": killed},
                     summary=f"coredns containers killed in {', '.join(k['pod'] for k in killed)}")
    answer = _supervisor(cluster, {"verb": "kill", "component": component, "node": node})
    return Fault("component-kill", {"component": component, "node": node, "killed": answer["killed"]},
                 summary=f"SIGKILL to {', '.join(f'{n} ({p})' for n, p in answer['killed'].items())}")


def component_stop(cluster: FaultTarget, component: str, node: str | None = None) -> Fault:
    """Stop the component (SIGTERM, then SIGKILL) and keep it down until component_start."""
    _check_component(cluster, component, node)
    if component == COREDNS:
        if node is not None:
            raise FaultError("node", "coredns is stopped as a whole (its Deployment scaled to 0): no node")
        replicas = _scale_dns(cluster, 0)
        fault = Fault("component-stop", {"component": component, "node": None}, undo={"replicas": replicas},
                      summary=f"coredns scaled from {replicas} to 0")
    else:
        answer = _supervisor(cluster, {"verb": "stop", "component": component, "node": node})
        fault = Fault("component-stop", {"component": component, "node": node},
                      summary=f"stopped {', '.join(c['name'] for c in answer['components'])}")
    with _store(cluster).changing() as changes:
        return changes.add(fault)


def component_start(cluster: FaultTarget, component: str, node: str | None = None) -> list[Fault]:
    """Start what component_stop stopped (also a component stopped with `svclab stop`)."""
    _check_component(cluster, component, node)
    with _store(cluster).changing() as changes:
        stopped = [f for f in changes.find("component-stop", component=component)
                   if node is None or f.params["node"] in (None, node)]
        if component == COREDNS:
            replicas = max([f.undo["replicas"] for f in stopped] or [DEFAULT_DNS_REPLICAS])
            _scale_dns(cluster, replicas)
        else:
            _supervisor(cluster, {"verb": "start", "component": component, "node": node})
        for fault in stopped:
            if node is None or fault.params["node"] == node:
                changes.remove(fault)
    return stopped


def _scale_dns(cluster: FaultTarget, replicas: int) -> int:
    """Scale kube-system/coredns; returns the replicas it had."""
    before: list[int] = []

    def change(deploy: pb.Deployment) -> None:
        before.append(deploy.spec.replicas)
        deploy.spec.replicas = replicas

    api.call(cluster, lambda client: api.update_retrying(client, "Deployment", DNS_DEPLOYMENT, DNS_NAMESPACE, change))
    return before[-1]


# ---- nodes ---------------------------------------------------------------------------------------

def _pod_processes(cluster: FaultTarget, node: str) -> list[int]:
    """The processes in the network namespaces of the node's pods (its kubelet marks each one)."""
    markers = cluster.state.path / "nodes" / node / "pods"
    paths = [f"/run/netns/{m.name}" for m in markers.iterdir() if m.suffix != ".log"] if markers.is_dir() else []
    inodes = {ino for ino in (procfs.ns_inode(p) for p in paths) if ino is not None}
    return procfs.processes_in_netns(inodes) if inodes else []


def node_crash(cluster: FaultTarget, node: str) -> Fault:
    """The node dies: its links down, kubelet and kube-proxy SIGKILLed and kept down, its pods'
    processes killed, until node_recover. Links first, as a power cut is silent at once: killed
    first, its pods' servers would answer the connections still arriving with RSTs for the
    moment the links stayed up (a client saw `refused`, not a timeout)."""
    name = cluster.check_node(node)
    host = cluster.host(name, field="node")
    with _store(cluster).changing() as changes:
        if changes.find("node-crash", node=name):
            raise FaultError("node", f"{name} is crashed already")
        held = changes.find("link-down", target=name)
        routes = links.down(host.netns, host.links) if not held else []
        killed = {}
        for component in NODE_COMPONENTS:
            answer = _supervisor(cluster, {"verb": "kill", "component": component, "node": name, "keepDown": True})
            killed.update(answer["killed"])
        pod_pids = [pid for pid in _pod_processes(cluster, name) if procfs.kill(pid)]
        lost = _lose_kernel_state(host.netns, name)
        return changes.add(Fault(
            "node-crash", {"node": name, "killed": killed, "podProcesses": pod_pids, "kernelState": lost},
            undo={"netns": host.netns, "links": list(host.links), "routes": routes, "linksWereDown": bool(held)},
            summary=f"{name} crashed: {', '.join(killed)} killed and kept down, {len(pod_pids)} pod processes "
                    f"killed, links down, {lost}"))


def _lose_kernel_state(netns: str, node: str) -> str:
    """What a power cut takes with the kernel: the node's Service rules and conntrack entries.
    Says what went (or what could not be removed: the crash stands either way)."""
    try:
        with podnet.entered_netns(netns):
            modes = backends.cleanup_all(node)
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        return f"its Service rules not all removed ({exc})"
    try:
        proxy.empty_conntrack(netns)
    except (RuntimeError, subprocess.SubprocessError) as exc:
        return f"{'/'.join(modes)} rules removed, conntrack not flushed ({exc})"
    return f"{'/'.join(modes)} rules and conntrack entries gone"


def node_recover(cluster: FaultTarget, node: str) -> list[Fault]:
    """Links up (unless a link-down fault holds them), kubelet and kube-proxy started again."""
    name = cluster.check_node(node)
    with _store(cluster).changing() as changes:
        crashed = changes.find("node-crash", node=name)
        for fault in crashed:
            if not fault.undo["linksWereDown"] and not changes.find("link-down", target=name):
                links.up(fault.undo["netns"], tuple(fault.undo["links"]), fault.undo["routes"])
            changes.remove(fault)
        for component in NODE_COMPONENTS:
            _supervisor(cluster, {"verb": "start", "component": component, "node": name})
    return crashed


def _node_processes(cluster: FaultTarget, node: str) -> list[int]:
    table = ProcessTable(cluster.state.path).load()
    roots = [r.pid for n, r in table.items() if n in (f"kubelet-{node}", f"kube-proxy-{node}") and r.alive()]
    return roots + procfs.descendants(roots)


def _signal(pids: list[int], sig: int) -> list[int]:
    done = []
    for pid in pids:
        try:
            os.kill(pid, sig)
            done.append(pid)
        except ProcessLookupError:
            pass
    return done


def node_freeze(cluster: FaultTarget, node: str) -> Fault:
    """SIGSTOP the node's kubelet and kube-proxy (first, so they start nothing new) and every
    process they started (pod commands), until node_thaw."""
    name = cluster.check_node(node)
    with _store(cluster).changing() as changes:
        if changes.find("node-freeze", node=name):
            raise FaultError("node", f"{name} is frozen already")
        stopped: list[int] = []
        for _ in range(3):  # a child started while we stopped its parent is caught on the next pass
            fresh = [pid for pid in _node_processes(cluster, name) if pid not in stopped]
            if not fresh:
                break
            stopped += _signal(fresh, signal.SIGSTOP)
        if not stopped:
            raise FaultError("node", f"{name} has no running kubelet or kube-proxy to freeze")
        return changes.add(Fault("node-freeze", {"node": name},
                                 undo={"pids": [[pid, procfs.starttime(pid)] for pid in stopped]},
                                 summary=f"{name} frozen: {len(stopped)} processes stopped"))


def node_thaw(cluster: FaultTarget, node: str) -> list[Fault]:
    name = cluster.check_node(node)
    with _store(cluster).changing() as changes:
        frozen = changes.find("node-freeze", node=name)
        for fault in frozen:
            _continue(fault)
            changes.remove(fault)
    return frozen


def _continue(fault: Fault) -> None:
    """SIGCONT the processes a freeze stopped that still are those processes."""
    _signal([pid for pid, started in fault.undo["pids"] if procfs.starttime(pid) == started], signal.SIGCONT)


def continue_frozen(cluster: FaultTarget) -> list[Fault]:
    """Continue every frozen process (before `down`/`clean` stop them: a stopped process would
    sit on SIGTERM until the SIGKILL)."""
    try:
        frozen = [f for f in _store(cluster).load() if f.kind == "node-freeze"]
    except (OSError, ValueError):
        return []
    for fault in frozen:
        _continue(fault)
    return frozen
