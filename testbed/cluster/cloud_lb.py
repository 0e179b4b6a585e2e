"""The cloud load balancer of a cluster: two processes and the edge bridge's controller.

* `svclab cloud-controller` in the router's namespace (asyncio, API client): external
  IPs, status, health checks; publishes the table on <state-dir>/lb.sock.
* `svclab lb-controller` in the root namespace, where ovs-vswitchd is: the os-ken app,
  listening on 127.0.0.1:<free port>. Two processes because os-ken brings its own hub
  (threads or eventlet) and the API client is grpc.aio.

The edge bridge gets the controller with fail_mode=secure: when the controller is gone
the switch keeps its rules and groups (it goes on balancing new connections, carrying
established ones and answering ARP) instead of falling back to a plain learning switch.
"""

from __future__ import annotations

import re
import socket
import subprocess
import time
from pathlib import Path
from typing import Callable

from testbed.cloud.lb_table import Table
from testbed.cluster.config import ClusterConfig
from testbed.cluster.supervisor import Supervisor
from testbed.node.routes import run_checked
from testbed.cluster.net import ClusterNetwork
from testbed.cluster.topo import EDGE_OFPORT_GW

CLOUD_CONTROLLER = "cloud-controller"
LB_CONTROLLER = "lb-controller"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(config: ClusterConfig, state_dir: Path, processes: Supervisor, network: ClusterNetwork) -> int:
    """Start both processes; returns the OpenFlow port for attach(). os-ken takes a second or two to import."""
    common = ["--state-dir", str(state_dir), "--name", config.name]
    processes.start(CLOUD_CONTROLLER, [
        *common, "cloud-controller", "--pool", config.load_balancer_pool,
        "--health-interval", str(config.lb_health_interval), "--health-timeout", str(config.lb_health_timeout),
        "--healthy-threshold", str(config.lb_healthy_threshold),
        "--unhealthy-threshold", str(config.lb_unhealthy_threshold),
    ], netns=network.netns("gw"))
    gw_mac = run_checked(["ip", "netns", "exec", network.netns("gw"), "cat", "/sys/class/net/eth1/address"]).strip()
    port = free_port()
    processes.start(LB_CONTROLLER, [
        *common, "lb-controller", "--openflow-port", str(port), "--gw-port", str(EDGE_OFPORT_GW),
        "--gw-mac", gw_mac, "--ct-zone", str(network.names.ct_zone),
    ])
    return port


def attach(bridge: str, port: int, timeout: float, alive: Callable[[], None]) -> None:
    """Once the app listens, make it the bridge's controller (OpenFlow 1.3, fail_mode=secure); wait until connected.

    Attaching only once it listens spares OVS's reconnect backoff (1, 2, 4 ... s).
    """
    deadline = time.monotonic() + timeout
    while not listening(port):
        alive()
        if time.monotonic() > deadline:
            raise TimeoutError(f"the load balancer app did not listen on 127.0.0.1:{port} in {timeout:.0f} s")
        time.sleep(0.05)
    run_checked(["ovs-vsctl", "set-controller", bridge, f"tcp:127.0.0.1:{port}",
                 "--", "set", "controller", bridge, "max_backoff=1000",
                 "--", "set", "bridge", bridge, "protocols=OpenFlow13", "fail_mode=secure"])
    while not connected(bridge):
        alive()
        if time.monotonic() > deadline:
            raise TimeoutError(f"{bridge} did not connect to the load balancer app in {timeout:.0f} s")
        time.sleep(0.05)


def listening(port: int) -> bool:
    """A TCP listener on 127.0.0.1:port in this namespace (read from /proc: no probe connection)."""
    want = f"0100007F:{port:04X}"
    lines = Path("/proc/net/tcp").read_text().splitlines()[1:]
    return any(f[1] == want and f[3] == "0A" for f in (line.split() for line in lines))


def connected(bridge: str) -> bool:
    state = subprocess.run(["ovs-vsctl", "get", "controller", bridge, "is_connected"], capture_output=True, text=True)
    return state.returncode == 0 and state.stdout.strip() == "true"


def published_table(state_dir: Path, timeout: float = 5) -> Table:
    """What the cloud-controller publishes right now (reads the first line of its feed)."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(timeout)
        sock.connect(str(state_dir / "lb.sock"))
        return Table.loads(sock.makefile("rb").readline())


def node_port_state(cluster: str, node: str, state: str) -> None:
    """Crash ("down") or revive ("up") a node as the network sees it: its port on the nodes bridge.

    The node drops off the network (nothing in or out) while its namespace, addresses,
    routes and rules stay as they were, so a revived node is the same machine again.
    (Taking eth0 down inside the node instead makes the kernel drop the node's routes.)
    """
    run_checked(["ovs-ofctl", "mod-port", f"{cluster}-nodes", f"{cluster}-n{node.removeprefix('node')}", state])


def _ofctl(*args: str) -> str:
    return run_checked(["ovs-ofctl", "-O", "OpenFlow13", *args])


def group_buckets(bridge: str) -> dict[int, list[tuple[str, int]]]:
    """Per select group of the edge bridge: the (node IP, nodePort) of each bucket, in bucket order."""
    out: dict[int, list[tuple[str, int]]] = {}
    for line in _ofctl("dump-groups", bridge).splitlines():
        m = re.search(r"group_id=(\d+),type=select", line)
        if m:
            out[int(m.group(1))] = [(ip, int(port)) for ip, port in re.findall(r"nat\(dst=([\d.]+):(\d+)\)", line)]
    return out


def group_new_connections(bridge: str, group_id: int) -> dict[str, int]:
    """New connections each node got through one group: its buckets' packet counters.

    Only a connection's first packet goes through the group (the tracker carries the
    rest), so a bucket's packet count is the number of connections it was given. OVS
    pushes counters from the datapath every so often: revalidator/wait makes them current.
    """
    subprocess.run(["ovs-appctl", "revalidator/wait"], capture_output=True, timeout=10)
    nodes = [ip for ip, _ in group_buckets(bridge).get(group_id, [])]
    for line in _ofctl("dump-group-stats", bridge).splitlines():
        if f"group_id={group_id}," in line:
            counts = [int(n) for n in re.findall(r"bucket\d+:packet_count=(\d+)", line)]
            return dict(zip(nodes, counts))
    return {}
