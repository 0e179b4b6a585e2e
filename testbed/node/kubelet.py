"""The kubelet: registers its node, heartbeats, and runs the pods bound to it.

It runs inside its node's network namespace. For each pod it makes a network
namespace joined to the node's cni0 bridge (node/podnet.py), takes the next
free address of the node's pod CIDR, starts the pod's workload (the built-in
server, or the container's command as an unprivileged process), probes
readiness and writes the pod's status; a workload that exits is restarted as
the pod's restartPolicy says (containers.py). It also routes every other node's
pod CIDR via that node's address (host-gw: plain routing, no overlay, no NAT).
It serves a small container-runtime socket (runtime.py) on which fault
injection kills a pod's containers.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import os
import shutil
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from google.protobuf.message import Message
from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from testbed.api.errors import ApiError, AlreadyExists, Conflict, NotFound
from testbed.api.meta import copy_of, now_rfc3339
from testbed.api.v1 import api_pb2 as pb
from testbed.client.client import ApiClient
from testbed.client.informer import Informer, WorkQueue, run_worker
from testbed.component import run_component
from testbed import fault, naming
from testbed.node import containers, podnet, probes, routes, runtime
from testbed.node.dns import DNS_IMAGE, ClusterRecords, DnsServer
from testbed.node.workload import BuiltinServer, PodIdentity

log = logging.getLogger("svclab.kubelet")

DNS_SERVICE_IP = "10.96.0.10"
READY_RETRY = 0.05  # fast first probes: pod create -> Ready is a measured number
# A ready pod without a readinessProbe whose server the kubelet hosts itself (built-in server,
# DNS) is re-probed every 10 s, upstream's default period (upstream does not probe such pods
# at all). Every second, as command containers are, cost ~1,000 connections/s at 1,000 pods,
# half the kubelets' CPU on this 2-core machine while the rest of the pods were starting.
BUILTIN_PROBE_PERIOD = 10
LINK_UP_TIMEOUT = 1.0  # seconds to wait for a new pod's veth to come up before the first probe
DEFAULT_MAX_PODS = 110  # upstream's --max-pods default
SANDBOX_CONDITION = "PodReadyToStartContainers"  # False while the pod's network cannot be made


class NoAddressAvailable(RuntimeError):
    """Every address of the node's pod CIDR is in use (the words of CNI's host-local IPAM)."""


def pre_stop_seconds(pod: pb.Pod) -> float:
    """The longest preStop sleep of the pod's containers, within its termination grace period
    (Kubernetes' default 30 s), as the kubelet caps hooks."""
    sleeps = [c.lifecycle.pre_stop.sleep.seconds for c in pod.spec.containers if c.lifecycle.pre_stop.HasField("sleep")]
    grace = pod.spec.termination_grace_period_seconds if pod.spec.HasField("termination_grace_period_seconds") else 30
    return float(min(max(sleeps, default=0), grace))


@dataclass
class RunningPod:
    uid: str
    netns: str
    ip: str
    server: BuiltinServer | DnsServer | None = None
    process: subprocess.Popen | None = None
    probe_task: asyncio.Task | None = None
    ready: bool | None = None
    terminating: asyncio.Task | None = None  # deleted: preStop, then stop (_terminate)
    run: containers.ContainerRun = field(default_factory=containers.ContainerRun)

    def exit_code(self) -> int | None:
        """How the workload ended, None while it runs."""
        if self.process is not None:
            code = self.process.poll()
            return None if code is None else containers.exit_code_of(code)
        return self.run.exit_code  # a built-in server killed, or a command waiting for its restart


@dataclass
class KubeletConfig:
    cluster: str
    node_name: str
    node_ip: str
    node_netns: str
    state_dir: Path
    cluster_domain: str = "cluster.local"
    dns_ip: str = DNS_SERVICE_IP
    heartbeat_interval: float = 1.0
    max_pods: int = DEFAULT_MAX_PODS
    extra: dict = field(default_factory=dict)


class Kubelet:
    def __init__(self, client: ApiClient, config: KubeletConfig) -> None:
        self.client = client
        self.config = config
        self.pods = Informer(client, "Pod", field_selector=f"spec.nodeName={config.node_name}")
        self.nodes = Informer(client, "Node")
        self.queue = WorkQueue()
        self.running: dict[tuple[str, str], RunningPod] = {}
        self.bridge: podnet.NodeBridge | None = None
        self.pod_cidr: ipaddress.IPv4Network | None = None
        self.routes = routes.NodeRoutes()
        self.pods.on_change(lambda _t, old, new: self.queue.add(_key(new or old)))
        self.nodes.on_change(self._on_node)
        self._cidr_ready = asyncio.Event()
        self._last_ip_index = -1
        self.dns_records: ClusterRecords | None = None  # started when this node runs a DNS pod
        self._waiting_for_ip: set[tuple[str, str]] = set()  # retried at once when a pod stops

    # ------------------------------------------------------------ node

    @property
    def pods_dir(self) -> Path:
        return self.config.state_dir / "nodes" / self.config.node_name / "pods"

    @property
    def runtime_socket(self) -> Path:
        return self.config.state_dir / "nodes" / self.config.node_name / runtime.SOCKET

    async def register(self) -> None:
        node = pb.Node()
        node.metadata.name = self.config.node_name
        node.metadata.labels["kubernetes.io/hostname"] = self.config.node_name
        node.status.addresses.add(type="InternalIP", address=self.config.node_ip)
        node.status.addresses.add(type="Hostname", address=self.config.node_name)
        self._set_ready(node)
        try:
            await self.client.create(node)
        except AlreadyExists:
            current = await self.client.get("Node", self.config.node_name)
            current.status.CopyFrom(node.status)
            self._set_ready(current)
            await self.client.update_status(current)

    def _set_ready(self, node: pb.Node) -> None:
        now = now_rfc3339()
        ready = next((c for c in node.status.conditions if c.type == "Ready"), None)
        if ready is None:
            ready = node.status.conditions.add(type="Ready", last_transition_time=now)
        if ready.status != "True":
            ready.last_transition_time = now
        ready.status, ready.reason, ready.message = "True", "KubeletReady", "kubelet is posting ready status"
        ready.last_heartbeat_time = now
        pods = str(self.max_pods())
        for resources in (node.status.capacity, node.status.allocatable):
            resources["pods"] = pods

    def max_pods(self) -> int:
        """Pods this node takes: --max-pods, at most the addresses of its pod CIDR."""
        if self.pod_cidr is None:
            return self.config.max_pods
        return min(self.config.max_pods, len(_pod_addresses(self.pod_cidr)))

    async def heartbeat(self) -> None:
        while True:
            await asyncio.sleep(self.config.heartbeat_interval)
            try:
                node = await self.client.get("Node", self.config.node_name)
                self._set_ready(node)
                node.metadata.resource_version = ""  # the kubelet owns node status: no conflicts
                await self.client.update_status(node)
            except NotFound:
                await self.register()
            except (Conflict, ApiError) as exc:
                log.debug("heartbeat: %s", exc)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the node must keep posting status
                log.exception("heartbeat failed (retrying)")

    def _on_node(self, _type: str, old: Message | None, new: Message | None) -> None:
        node = new or old
        if node.metadata.name == self.config.node_name:
            if new is not None and new.spec.pod_cidr and self.pod_cidr is None:
                self.pod_cidr = ipaddress.ip_network(new.spec.pod_cidr)
                self._cidr_ready.set()
            return
        internal = next((a.address for a in node.status.addresses if a.type == "InternalIP"), "")
        if new is None or not new.spec.pod_cidr or not internal:
            if old is not None and old.spec.pod_cidr:
                self.routes.remove(old.spec.pod_cidr)
            return
        self.routes.ensure(new.spec.pod_cidr, internal)

    # ------------------------------------------------------------ pods

    async def sync_pod(self, key: tuple[str, str]) -> None:
        pod = self.pods.get(*key)
        running = self.running.get(key)
        if running is not None and (pod is None or pod.metadata.uid != running.uid):
            await self._stop(key)
            running = None
        if pod is None:
            self._waiting_for_ip.discard(key)
            return
        fault.check(pod, "kubelet")
        if pod.metadata.deletion_timestamp:
            if running is None:
                await self._finish_deletion(pod)
            elif running.terminating is None:  # its own task: the worker goes on with other pods meanwhile
                running.terminating = asyncio.create_task(self._terminate(key, pod))
            return
        if running is None and pod.status.phase in ("Pending", "Running", ""):
            await self._start(pod)

    def _next_ip(self, pod: pb.Pod) -> str:
        """The next free address after the last one handed out, like CNI's host-local IPAM:
        a new pod does not get the address of the pod that just went (stale conntrack, ARP)."""
        used = {r.ip for r in self.running.values()}
        if pod.status.pod_ip and ipaddress.ip_address(pod.status.pod_ip) in self.pod_cidr and pod.status.pod_ip not in used:
            return pod.status.pod_ip  # restarted kubelet: keep the address the pod had
        hosts = _pod_addresses(self.pod_cidr)
        for offset in range(1, len(hosts) + 1):
            candidate = hosts[(self._last_ip_index + offset) % len(hosts)]
            if candidate not in used:
                self._last_ip_index = (self._last_ip_index + offset) % len(hosts)
                return candidate
        raise NoAddressAvailable(f"failed to allocate for range 0: no IP addresses available in range set: "
                                 f"{hosts[0]}-{hosts[-1]}")

    async def _start(self, pod: pb.Pod) -> None:
        key = _key(pod)
        netns = naming.pod_netns(self.config.cluster, pod.metadata.uid)
        try:
            ip = self._next_ip(pod)
        except NoAddressAvailable as exc:  # stays ContainerCreating: retried when an address frees
            self._waiting_for_ip.add(key)
            await self._write_sandbox_failure(pod, f"Failed to create pod sandbox: {exc}")
            raise
        self._waiting_for_ip.discard(key)
        running = RunningPod(pod.metadata.uid, netns, ip)
        running.run.carry_over(pod)
        self.running[key] = running
        self._mark(netns, create=True)
        try:
            self.bridge.add_pod(netns, ip, naming.pod_host_ifname(pod.metadata.uid))
            self._write_resolv_conf(pod, netns)
            await self._start_workload(pod, running)
        except Exception as exc:
            log.error("pod %s/%s failed to start: %s", *key, exc)
            await self._stop(key)
            await self._write_status(pod, phase="Failed", reason="StartError", message=str(exc))
            return
        await self._link_up(naming.pod_host_ifname(pod.metadata.uid))
        ready = await self._probe(pod, running)
        await self._write_status(pod, phase="Running", ip=ip, ready=ready)
        running.ready = ready
        running.probe_task = asyncio.create_task(self._probe_loop(key))

    async def _start_workload(self, pod: pb.Pod, running: RunningPod) -> None:
        """The pod's containers: its command as a process, else the built-in server or DNS."""
        netns = running.netns
        container = pod.spec.containers[0] if pod.spec.containers else pb.Container()
        if container.command:
            running.process = self._spawn(netns, list(container.command) + list(container.args), pod)
            containers.watch_exit(running.process, running.run.wake.set)
        elif container.image == DNS_IMAGE:
            if self.dns_records is None:
                self.dns_records = ClusterRecords(self.client, self.config.cluster_domain)
            running.server = DnsServer(self.dns_records)
            await running.server.start(lambda: podnet.entered_netns(netns))
        else:
            identity = PodIdentity(pod.metadata.name, pod.metadata.namespace, running.ip, self.config.node_name)
            ports = [(p.protocol, p.container_port) for c in pod.spec.containers for p in c.ports]
            running.server = BuiltinServer(identity, ports)
            await running.server.start(lambda: podnet.entered_netns(netns))
        running.run.started()

    def kill_containers(self, namespace: str, name: str) -> list[str]:
        """The runtime socket's kill: the pod's workload dies as by SIGKILL (a built-in server
        stops serving, a command is killed); the probe loop then restarts it per restartPolicy."""
        key = (namespace, name)
        running, pod = self.running.get(key), self.pods.get(*key)
        if running is None or pod is None or running.terminating is not None:
            raise runtime.RuntimeRequestError(f"pod {namespace}/{name} is not running on {self.config.node_name}")
        if running.exit_code() is not None:
            raise runtime.RuntimeRequestError(f"pod {namespace}/{name}: its containers are not running (restarting)")
        if running.process is not None:
            os.killpg(running.process.pid, signal.SIGKILL)
        elif running.server is not None:
            running.server.stop()
            running.server = None
            running.run.exit_code = containers.KILLED
        running.run.wake.set()
        return [c.name for c in pod.spec.containers]

    async def _container_exited(self, key: tuple[str, str], pod: pb.Pod, running: RunningPod, code: int) -> bool:
        """Restart the workload as restartPolicy says (False: the pod is done, Failed or Succeeded)."""
        running.run.exited(code)
        if running.process is not None:
            running.process = None
        log.info("pod %s/%s: container exited %d", *key, code)
        if not containers.should_restart(pod.spec.restart_policy, code):
            phase, reason = ("Succeeded", "Completed") if code == 0 else ("Failed", "Error")
            while not await self._write_status(self.pods.get(*key) or pod, phase=phase, ip=running.ip, reason=reason,
                                               message=f"command exited {code}"):
                await asyncio.sleep(1)  # the pod's end must be posted: nothing posts it later
            return False
        delay = running.run.restart_delay(asyncio.get_running_loop().time())
        running.ready = False
        if delay:
            running.run.waiting = containers.CRASH_LOOP
            log.info("pod %s/%s: restarting in %.0f s (%s)", *key, delay, containers.CRASH_LOOP)
        await self._write_status(self.pods.get(*key) or pod, phase="Running", ip=running.ip, ready=False)
        await asyncio.sleep(delay)
        running.run.restarts += 1
        await self._start_workload(self.pods.get(*key) or pod, running)
        await self._write_status(self.pods.get(*key) or pod, phase="Running", ip=running.ip, ready=False)
        return True

    async def _link_up(self, host_ifname: str, timeout: float = LINK_UP_TIMEOUT) -> None:
        """Wait until the kernel has brought the pod's veth up (carrier, bridge port forwarding).

        It does that asynchronously (linkwatch), a few ms after add_pod() returns when the
        machine is busy. A first probe sent before then loses its ARP request on the port, and
        ARP retries only after 1 s (retrans_time_ms): the pod stayed unready for 1 s, and this
        worker, which starts pods one at a time, was stuck behind it.
        """
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            if self.bridge.port_ready(host_ifname) or asyncio.get_running_loop().time() > deadline:
                return
            await asyncio.sleep(0.002)

    def _spawn(self, netns: str, argv: list[str], pod: pb.Pod) -> subprocess.Popen:
        """The container's command in the pod's namespace, unprivileged, with the pod's resolv.conf."""
        log_path = self.pods_dir / f"{netns}.log"
        with open(log_path, "ab") as out:
            return subprocess.Popen(
                ["ip", "netns", "exec", netns, "setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
                 "--", *argv],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                env={"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/tmp",
                     "POD_NAME": pod.metadata.name, "POD_NAMESPACE": pod.metadata.namespace,
                     "NODE_NAME": self.config.node_name},
            )

    def _write_resolv_conf(self, pod: pb.Pod, netns: str) -> None:
        """/etc/netns/<ns>/resolv.conf: `ip netns exec` (and so `svclab exec`) binds it over /etc/resolv.conf."""
        domain = self.config.cluster_domain
        ns = pod.metadata.namespace
        directory = Path("/etc/netns") / netns
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "resolv.conf").write_text(
            f"search {ns}.svc.{domain} svc.{domain} {domain}\nnameserver {self.config.dns_ip}\noptions ndots:5\n"
        )

    async def _terminate(self, key: tuple[str, str], pod: pb.Pod) -> None:
        """A deleted pod: its preStop sleep (it keeps serving, no longer ready, while the
        endpoint leaves every node's rules), then stopped and its object removed."""
        seconds = pre_stop_seconds(pod)
        if seconds:
            log.info("pod %s/%s: preStop sleep %s s", pod.metadata.namespace, pod.metadata.name, seconds)
            await asyncio.sleep(seconds)
        await self._stop(key)
        await self._finish_deletion(pod)

    async def _finish_deletion(self, pod: pb.Pod) -> None:
        try:
            await self.client.delete("Pod", pod.metadata.name, pod.metadata.namespace, grace_period=0)
        except NotFound:
            pass

    async def _stop(self, key: tuple[str, str]) -> None:
        running = self.running.pop(key, None)
        if running is None:
            return
        if running.probe_task is not None:
            running.probe_task.cancel()
        if running.server is not None:
            running.server.stop()
        if running.process is not None and running.process.poll() is None:
            os.killpg(running.process.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(asyncio.to_thread(running.process.wait), 5)
            except asyncio.TimeoutError:
                os.killpg(running.process.pid, signal.SIGKILL)
        self.bridge.remove_pod(running.netns, naming.pod_host_ifname(running.uid))
        shutil.rmtree(Path("/etc/netns") / running.netns, ignore_errors=True)
        self._mark(running.netns, create=False)
        await asyncio.to_thread(self._forget_neighbour, running.ip)
        for waiting in self._waiting_for_ip:  # its address is free: no need to wait for a back-off
            self.queue.add(waiting)

    def _forget_neighbour(self, ip: str) -> None:
        """Drop the node's neighbour entry of a removed pod's address: it names the old pod's
        MAC, REACHABLE for up to 30 s, and a full pod CIDR hands the address out again at once."""
        try:
            with podnet.entered_netns(self.config.node_netns), IPRoute() as ipr:
                index = ipr.link_lookup(ifname=self.bridge.bridge)
                if index:
                    ipr.neigh("del", dst=ip, ifindex=index[0])
        except (NetlinkError, OSError):
            pass  # no entry: nothing to forget

    def _mark(self, netns: str, create: bool) -> None:
        """A file per pod namespace this node made, so a restarted kubelet or `svclab clean` finds it."""
        marker = self.pods_dir / netns
        if create:
            self.pods_dir.mkdir(parents=True, exist_ok=True)
            marker.touch()
        else:
            marker.unlink(missing_ok=True)

    # ------------------------------------------------------------ readiness

    async def _probe(self, pod: pb.Pod, running: RunningPod) -> bool:
        if running.exit_code() is not None:
            return False
        for kind, port, path in probes.readiness_checks(pod):
            if not await probes.check(running.ip, port, kind, path, netns=running.netns):
                return False
        return True

    async def _probe_loop(self, key: tuple[str, str]) -> None:
        while True:
            running = self.running.get(key)
            pod = self.pods.get(*key)
            if running is None or pod is None:
                return
            period = min((c.readiness_probe.period_seconds for c in pod.spec.containers
                          if c.readiness_probe.period_seconds),
                         default=1 if running.process is not None else BUILTIN_PROBE_PERIOD)
            code = running.exit_code()
            if code is None:  # nothing can set wake between the check and clear(): no await
                running.run.wake.clear()
                try:  # woken at once when the workload exits
                    await asyncio.wait_for(running.run.wake.wait(), READY_RETRY if not running.ready else period)
                except asyncio.TimeoutError:
                    pass
                code = running.exit_code()
            if code is not None:
                if not await self._container_exited(key, self.pods.get(*key) or pod, running, code):
                    return
                continue
            ready = await self._probe(pod, running)
            current = self.pods.get(*key) or pod
            # Reconcile with the API, not only with what was last posted (upstream's status
            # manager does the same): the node controller marks a silent node's pods not
            # ready, and a kubelet back from a stall must put its own verdict back.
            if ready != running.ready or not _posted(current, running, ready):
                running.ready = ready
                await self._write_status(current, phase="Running", ip=running.ip, ready=ready)

    async def _write_status(self, pod: pb.Pod, phase: str, ip: str = "", ready: bool = False,
                            reason: str = "", message: str = "") -> bool:
        """Post the pod's status; False if the write failed (logged; the caller may try again)."""
        update = copy_of(pod)
        status = update.status
        status.phase, status.reason, status.message = phase, reason, message
        status.host_ip = self.config.node_ip
        if ip:
            status.pod_ip = ip
        if not status.start_time:
            status.start_time = now_rfc3339()
        _set_condition(status, "Ready", "True" if ready and phase == "Running" else "False")
        _set_condition(status, SANDBOX_CONDITION, "True")
        _set_condition(status, "PodScheduled", "True")  # it is on this node
        running = self.running.get(_key(pod))
        if running is not None and running.uid == pod.metadata.uid:
            del status.container_statuses[:]
            status.container_statuses.extend(running.run.statuses(pod, ready and phase == "Running"))
        update.metadata.resource_version = ""
        try:
            await self.client.update_status(update)
        except NotFound:
            pass
        except ApiError as exc:  # the API server away or just back: the probe loop posts it again
            log.warning("pod %s/%s: writing its status failed: %s", *_key(pod), exc.message)
            return False
        return True

    async def _write_sandbox_failure(self, pod: pb.Pod, message: str) -> None:
        """Pending (ContainerCreating) with PodReadyToStartContainers=False naming the reason,
        written once per change."""
        current = next((c for c in pod.status.conditions if c.type == SANDBOX_CONDITION), None)
        if current is not None and (current.status, current.message) == ("False", message):
            return
        log.warning("pod %s/%s: %s", pod.metadata.namespace, pod.metadata.name, message)
        update = copy_of(pod)
        update.status.phase, update.status.host_ip = "Pending", self.config.node_ip
        _set_condition(update.status, SANDBOX_CONDITION, "False", "FailedCreatePodSandBox", message)
        _set_condition(update.status, "PodScheduled", "True")
        update.metadata.resource_version = ""
        try:
            await self.client.update_status(update)
        except NotFound:
            pass

    # ------------------------------------------------------------ run

    def clean_orphans(self) -> None:
        """Pod namespaces this node made before a restart whose pods are gone."""
        wanted = {naming.pod_netns(self.config.cluster, p.metadata.uid) for p in self.pods.items()}
        if not self.pods_dir.exists():
            return
        for marker in self.pods_dir.iterdir():
            if marker.suffix == ".log" or marker.name in wanted:
                continue
            self.bridge.remove_pod(marker.name)
            shutil.rmtree(Path("/etc/netns") / marker.name, ignore_errors=True)
            marker.unlink(missing_ok=True)

    async def run(self) -> None:
        await self.register()
        tasks = [asyncio.create_task(i.run()) for i in (self.nodes, self.pods)]
        await self.nodes.synced.wait()
        await self._cidr_ready.wait()
        self.bridge = podnet.NodeBridge(self.config.node_netns, str(self.pod_cidr))
        self.bridge.ensure()
        await self.pods.synced.wait()
        for pod in self.pods.items():  # adopt pods from before a restart
            netns = naming.pod_netns(self.config.cluster, pod.metadata.uid)
            if Path(naming.netns_path(netns)).exists():
                self.bridge.remove_pod(netns, naming.pod_host_ifname(pod.metadata.uid))
        self.clean_orphans()
        log.info("node %s ready: pod CIDR %s", self.config.node_name, self.pod_cidr)
        tasks.append(asyncio.create_task(runtime.serve(self.runtime_socket, self.kill_containers)))
        tasks.append(asyncio.create_task(self.heartbeat()))
        tasks.append(asyncio.create_task(run_worker("kubelet", self.queue, self.sync_pod)))
        for pod in self.pods.items():
            self.queue.add(_key(pod))
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            task.result()

    async def shutdown(self) -> None:
        """Stop every pod this kubelet runs (on `svclab down`)."""
        for key in list(self.running):
            await self._stop(key)
        self.routes.close()
        if self.bridge is not None:
            self.bridge.close()


@functools.lru_cache(maxsize=4)
def _pod_addresses(cidr: ipaddress.IPv4Network) -> tuple[str, ...]:
    """The pod addresses of a node's CIDR (.1 is the gateway on cni0), made once: 253 address
    objects per pod started cost ~5 ms of a busy kubelet's time."""
    return tuple(str(host) for host in cidr.hosts())[1:]


def _posted(pod: pb.Pod, running: RunningPod, ready: bool) -> bool:
    """Does the API hold what this kubelet last meant to post (a write may have failed)?"""
    posted_ready = any(c.type == "Ready" and c.status == "True" for c in pod.status.conditions)
    restarts = max((c.restart_count for c in pod.status.container_statuses), default=0)
    return (posted_ready == ready and pod.status.phase == "Running" and pod.status.pod_ip == running.ip
            and restarts == running.run.restarts)


def _set_condition(status: pb.PodStatus, type_: str, value: str, reason: str = "", message: str = "") -> None:
    cond = next((c for c in status.conditions if c.type == type_), None) or status.conditions.add(type=type_)
    if cond.status != value:
        cond.status, cond.last_transition_time = value, now_rfc3339()
    cond.reason, cond.message = reason, message


def _key(pod: Message) -> tuple[str, str]:
    return (pod.metadata.namespace, pod.metadata.name)


def run(address: str, token: str, config: KubeletConfig) -> None:
    kubelets: list[Kubelet] = []

    async def work(client: ApiClient) -> None:
        kubelets.append(Kubelet(client, config))
        await kubelets[0].run()

    async def cleanup() -> None:
        for kubelet in kubelets:
            await kubelet.shutdown()

    run_component(address, token, work, cleanup)
