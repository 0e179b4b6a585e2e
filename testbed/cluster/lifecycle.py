"""A whole cluster: network, control plane, node components, addons; up and down.

`Cluster.start()` is what `svclab up` does, step by step with progress:
the API server (root namespace, Unix socket), the Mininet network (nodes,
router, client), the controller-manager, then a kubelet and a kube-proxy inside
each node's namespace, the cloud load balancer (cloud_lb.py), the cluster
add-ons, and the user's manifests. `stop()` undoes it
in reverse; `clean()` removes what a cluster whose processes died left behind.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from google.protobuf.message import Message

from testbed.api.errors import ApiError
from testbed.client.apply import apply_objects
from testbed.client.client import ApiClient
from testbed.api.v1 import api_pb2 as pb
from testbed.manifests import load_paths
from testbed.paths import StateDir
from testbed import naming
from testbed.cluster import cloud_lb, net, netclean, procfs, topo
from testbed.node import cgroups, podnet
from testbed.cluster.config import ClusterConfig
from testbed.cluster.processes import ProcessTable, stop_pids
from testbed.cluster.supervisor import RESTARTING, Supervisor
from testbed.node.routes import run_checked

Progress = Callable[[str], None]
ADDONS = Path(__file__).resolve().parent.parent / "addons"


class ClusterError(RuntimeError):
    pass


@dataclass
class Summary:
    nodes: dict[str, str]
    client_ip: str
    services: list[Message]


class Cluster:
    def __init__(self, config: ClusterConfig, state: StateDir, progress: Progress = lambda line: None) -> None:
        self.config = config
        self.state = state
        self.progress = progress
        self.processes = ProcessTable(state.path)
        self.supervisor = Supervisor(self.processes, state.path)
        self.network: net.ClusterNetwork | None = None
        self._attaching: concurrent.futures.Future | None = None
        self._start_deadline = 0.0

    # ------------------------------------------------------------ up

    def start(self, manifests: list[Message], timeout: float = 120) -> Summary:
        if self.config.proxy_mode != "iptables":
            from testbed.proxy import backends
            try:
                backends.check_mode(self.config.proxy_mode)
            except backends.Unsupported as exc:
                raise ClusterError(str(exc)) from None
        if is_running(self.state):
            raise ClusterError(f'cluster "{self.config.name}" is already running (svclab down --name {self.config.name})')
        leftovers = netclean.find_leftovers(self.config.name)
        if leftovers:
            raise ClusterError(f'cluster "{self.config.name}" left things behind; run `svclab clean --name '
                               f'{self.config.name}` first ({leftovers})')
        shutil.rmtree(self.state.path, ignore_errors=True)
        self.state.path.mkdir(parents=True, mode=0o700)
        started = time.monotonic()
        self._start_deadline = started + timeout  # every wait of the start, not each its own
        try:
            self.supervisor.run_in_background()
            self._start_apiserver()  # it starts up (imports, opens its store) while the network is built
            self._step(f"network: {self.config.nodes} nodes, router, client", self._start_network)
            self._step("API server", self._wait_apiserver)
            self._step("controller-manager", self._start_controller_manager)
            self._step("cloud load balancer", self._start_load_balancer)  # attached while the rest starts
            self._step("kubelets", self._start_kubelets)
            self._step(f"kube-proxies ({self.config.proxy_mode})", self._start_kube_proxies)
            summary = asyncio.run(self._converge(manifests, deadline=time.monotonic() + timeout))
            self._step("edge bridge attached to the load balancer", self._attach_load_balancer)
        except BaseException:
            kept = self._keep_logs()
            self.stop()
            if kept:
                self.progress(f"logs of the failed start kept in {kept}")
            raise
        self.progress(f"cluster {self.config.name} is up in {time.monotonic() - started:.1f} s")
        return summary

    def _keep_logs(self) -> Path | None:
        """Copy the components' logs out of the state directory, which stop() removes."""
        if not self.processes.logs.exists():
            return None
        kept = self.state.path.parent / f"{self.config.name}-failed-logs"
        shutil.rmtree(kept, ignore_errors=True)
        shutil.copytree(self.processes.logs, kept)
        return kept

    def _step(self, what: str, fn: Callable[[], None]) -> None:
        t0 = time.monotonic()
        fn()
        self.progress(f"  {what} ({time.monotonic() - t0:.1f} s)")

    def _start_apiserver(self) -> None:
        self.supervisor.start("apiserver", [
            "apiserver", "--state-dir", str(self.state.path), "--service-cidr", self.config.service_subnet,
            "--node-port-range", self.config.node_port_range,
        ])

    def _wait_apiserver(self) -> None:
        """Until the start's deadline: in the stock-kernel VM (TCG emulation) its imports alone take 15 s."""
        while not (self.state.api_socket.exists() and self.state.token_file.exists()):
            if time.monotonic() > self._start_deadline:
                raise ClusterError(f"the API server did not start; see {self.processes.logs / 'apiserver.log'}")
            time.sleep(0.02)

    def _start_network(self) -> None:
        self.network = net.ClusterNetwork(
            topo.TopologyConfig(self.config.name, self.config.nodes, self.config.node_subnet,
                                    self.config.external_subnet),
            self.state.path,
        )
        try:
            self.network.start()
        except net.MachineNotReady as exc:
            raise ClusterError(str(exc)) from None
        # Nodes reach Service IPs like any node of a real cluster: the route sends them
        # toward the router, and kube-proxy's DNAT in OUTPUT redirects them before they leave.
        for node in self.network.node_ips:
            self._in_node(node, ["ip", "route", "replace", self.config.service_subnet,
                                 "via", self.network.router_node_ip])

    def _in_node(self, node: str, argv: list[str]) -> None:
        run_checked(["ip", "netns", "exec", self.network.netns(node), *argv])

    def _start_controller_manager(self) -> None:
        self.supervisor.start("controller-manager", [
            "--state-dir", str(self.state.path), "controller-manager", "--cluster-cidr", self.config.pod_subnet,
            "--node-monitor-grace-period", str(self.config.node_monitor_grace_period),
        ])

    def _start_kubelets(self) -> None:
        for node, ip in self.network.node_ips.items():
            self.supervisor.start(f"kubelet-{node}", [
                "--state-dir", str(self.state.path), "--name", self.config.name, "kubelet",
                "--node-name", node, "--node-ip", ip, "--dns-ip", self.config.dns_ip,
            ], netns=self.network.netns(node))

    def _start_kube_proxies(self) -> None:
        for node in self.network.node_ips:
            self.supervisor.start(f"kube-proxy-{node}", [
                "--state-dir", str(self.state.path), "--name", self.config.name, "kube-proxy",
                "--node-name", node, *self.config.kube_proxy_flags(),
                "--metrics-address", f"{self.network.node_ip(node)}:10249",
            ], netns=self.network.netns(node))

    def _start_load_balancer(self) -> None:
        """Start its processes, and attach the edge bridge in the background as soon as os-ken
        listens (its start is a second or more of CPU on a busy 2-core machine): it overlaps
        the kubelets and kube-proxies starting and the nodes and pods getting Ready."""
        port = cloud_lb.start(self.config, self.state.path, self.supervisor, self.network)
        bridge = self.network.bridges["edge"]
        self._attaching = concurrent.futures.ThreadPoolExecutor(1).submit(
            cloud_lb.attach, bridge, port, max(30.0, self._start_deadline - time.monotonic()), self._check_processes)

    def _attach_load_balancer(self) -> None:
        self._attaching.result()

    async def _converge(self, manifests: list[Message], deadline: float) -> Summary:
        async with ApiClient.for_state_dir(self.state) as client:
            await self._wait(client, "nodes Ready", deadline, self._nodes_ready)
            await apply_objects(client, self._addons())
            if manifests:
                applied = await apply_objects(client, manifests)
                for item in applied:
                    self.progress(f"  {type(item.obj).__name__.lower()}/{item.obj.metadata.name} {item.action}")
            await self._wait(client, "pods Ready", deadline, _pods_ready)
            services, _ = await client.list("Service", "")
        return Summary(self.network.node_ips, self.network.client_ip, services)

    def _addons(self) -> list[Message]:
        objects = load_paths([str(ADDONS / "dns.yaml")]).objects
        for obj in objects:
            if isinstance(obj, pb.Service) and obj.metadata.name == "kube-dns":
                obj.spec.cluster_ip = self.config.dns_ip
        return objects

    async def _nodes_ready(self, client: ApiClient) -> tuple[bool, str]:
        nodes, _ = await client.list("Node")
        ready = [n for n in nodes if any(c.type == "Ready" and c.status == "True" for c in n.status.conditions)
                 and n.spec.pod_cidr]
        return len(ready) == self.config.nodes, f"{len(ready)}/{self.config.nodes}"

    async def _wait(self, client: ApiClient, what: str, deadline: float, check) -> None:
        t0 = time.monotonic()
        last = ""
        while True:
            self._check_processes()
            try:
                done, detail = await check(client)
            except ApiError as exc:
                done, detail = False, exc.message
            if done:
                self.progress(f"  {what}: {detail} ({time.monotonic() - t0:.1f} s)")
                return
            if detail != last:
                last = detail
            if time.monotonic() > deadline:
                raise ClusterError(f"timed out waiting for {what} ({detail})")
            await asyncio.sleep(0.05)

    def _check_processes(self) -> None:
        """While the cluster starts, a component that exits is an error (it would only crash-loop)."""
        for component in self.supervisor.status():
            if component["restarts"] or component["state"] == RESTARTING:
                last = "; ".join(component["lastError"][-2:])
                raise ClusterError(f"{component['name']} {component['lastExit'] or 'exited'} while the cluster "
                                   f"started (its log: {component['name']}.log): {last}")

    # ------------------------------------------------------------ down

    def stop(self) -> None:
        """Stop everything this cluster started: node components, control plane, network, files."""
        self.supervisor.shutdown()  # nothing restarts from here on
        _continue_frozen(self.config.name, self.state)
        table = self.processes.load()
        node_parts = ("kubelet-", "kube-proxy-")
        stop_pids([r for n, r in table.items() if n.startswith(node_parts)])  # kubelets stop their pods
        stop_pids([r for n, r in table.items() if not n.startswith(node_parts)])
        if self.network is not None:
            self.network.stop()
            self.network = None
        try:
            clean(self.config.name, self.state)
        except ClusterError as exc:  # everything else is gone; say what is left and how to finish
            self.progress(f"error: {exc}")


def _pods_ready_detail(pods: list[Message]) -> tuple[bool, str]:
    active = [p for p in pods if not p.metadata.deletion_timestamp]
    ready = [p for p in active if any(c.type == "Ready" and c.status == "True" for c in p.status.conditions)]
    return len(ready) == len(active), f"{len(ready)}/{len(active)}"


async def _pods_ready(client: ApiClient) -> tuple[bool, str]:
    pods, _ = await client.list("Pod", "")
    deployments, _ = await client.list("Deployment", "")
    want = sum(d.spec.replicas for d in deployments)
    done, detail = _pods_ready_detail(pods)
    return done and len(pods) >= want, detail


def _continue_frozen(cluster: str, state: StateDir) -> list:
    """Frozen processes (svclab fault node-freeze) continued first, so that SIGTERM stops them. The
    other fault state goes with the namespaces (nft tables, qdiscs, downed links) and the state
    directory (faults.json, the API's dns-error annotation)."""
    from testbed.faults.nodes import continue_frozen
    from testbed.faults.target import FaultTarget

    return continue_frozen(FaultTarget(cluster, state))


def is_running(state: StateDir) -> bool:
    return any(r.alive() for r in ProcessTable(state.path).load().values())


def clean(cluster: str, state: StateDir) -> list[str]:
    """Remove everything the cluster left behind; returns what was removed. Idempotent."""
    removed: list[str] = []
    removed += [f"fault {f.id} (node-freeze): processes continued" for f in _continue_frozen(cluster, state)]
    table = ProcessTable(state.path).load()
    alive = [r for r in table.values() if r.alive()]
    stop_pids(alive, timeout=5)
    removed += [f"process {r.name} ({r.pid})" for r in alive]
    removed += cgroups.remove_cluster(cluster)  # pods' processes, wherever a killed kubelet left them
    prefix = naming.pod_netns_prefix(cluster)
    pod_netns = sorted(naming.NETNS_DIR.glob(prefix + "*"))
    # Pod commands run in their own session: a kubelet killed with -9 leaves them running,
    # and once their namespace is unmounted nothing could find them any more.
    inodes = {ino for ino in (procfs.ns_inode(str(path)) for path in pod_netns) if ino is not None}
    killed = [pid for pid in procfs.processes_in_netns(inodes) if procfs.kill(pid)] if inodes else []
    procfs.wait_gone(killed)
    removed += [f"process {pid}" for pid in killed]
    for path in pod_netns:
        podnet.remove_netns(path.name)
        removed.append(f"netns {path.name}")
    for path in sorted(Path("/etc/netns").glob(prefix + "*")):
        shutil.rmtree(path, ignore_errors=True)
    result = netclean.clean(cluster, state.path)
    removed += [f"process {pid}" for pid in result.killed] + [f"bridge {b}" for b in result.bridges]
    removed += [f"interface {i}" for i in result.interfaces] + [f"netns {n}" for n in result.netns]
    if result.bridges_left:  # keep the state: a later clean, once OVS answers, finishes the job
        reason = next(iter(result.bridges_left.values()))
        raise ClusterError(f"could not delete the OVS bridges {', '.join(result.bridges_left)} ({reason}); "
                           "start Open vSwitch (make setup) and run `svclab clean` again")
    if state.path.exists():
        shutil.rmtree(state.path, ignore_errors=True)
        removed.append(f"state {state.path}")
    return removed

