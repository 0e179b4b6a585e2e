"""One cluster's network, built with Mininet on Open vSwitch, named after the cluster.

Layout (``c`` is the cluster name, 1-8 characters ``[a-z][a-z0-9]*``)::

    node1 .. nodeN ---- bridge c-nodes ---- gw ---- bridge c-edge ---- client
    node subnet (default 172.18.0.0/16)   (router)  external subnet (default 203.0.113.0/24)
    gw = .1, node i = .(i+1)                        gw = .1, client = .2

* Nodes, the router ``gw`` and the ``client`` are Mininet hosts: a ``bash`` in a network
  namespace of its own. ``gw`` forwards (``ip_forward=1`` inside its own namespace only);
  the client has a route to the node subnet via gw, the nodes one to the external subnet
  via gw. No default route, no NAT, no link to the root namespace's networking anywhere.
* Both bridges are OVS bridges in ``fail_mode=standalone`` (normal L2 learning) with no
  controller; a later issue attaches an OpenFlow controller to ``c-edge``. The datapath is
  the kernel one when the openvswitch kernel module is there (``/sys/module/openvswitch``
  or the ``ovs_datapath`` generic-netlink family), else the userspace one
  (``datapath_type=netdev``).
* Userspace datapath: OVS reads and writes the bridge ports with packet sockets and never
  completes checksums, so a TCP/UDP packet sent with TX checksum offload on arrives with a
  bad checksum and is dropped (TCP hangs, ping works). What matters is the host-side end
  (``eth0``/``eth1`` in each host, i.e. every sender, both directions of a connection);
  the switch-side end makes no difference (measured: host-only works, switch-only hangs).
  gw's own ends matter only for traffic gw itself terminates, not for forwarded packets.
  Packets a node will forward for its pods should be fine too (untested here): a device
  without TX checksum offload completes a CHECKSUM_PARTIAL packet in software on transmit.
  See ``TX_OFF_ENDS``.

Naming scheme. Everything derives from the cluster name, so two clusters never collide and
``clean()`` finds leftovers without the state record. Cluster names cannot contain ``-``,
so the ``c-`` prefix is unambiguous (cluster ``a`` owns ``a-*``, never ``ab-*``), and the
discovery patterns are anchored, exact shapes (``Names.*_re``). Names in the root
namespace are at most 8 + 6 = 14 characters (IFNAMSIZ allows 15).

* Mininet host names = named netns: ``c-node<i>``, ``c-client``, ``c-gw``, bind mounts
  ``/run/netns/c-<host>`` of the host shells' namespaces (``ip netns exec c-node1 ...``).
  The API uses the short names ``node<i>``, ``client``, ``gw``.
* OVS bridges (root ns; OVS also makes a device of the same name): ``c-nodes``, ``c-edge``.
* Bridge ports = switch-side veth ends (root ns): ``c-n<i>`` (node i), ``c-ngw`` (gw on
  c-nodes), ``c-ecl`` (client on c-edge), ``c-egw`` (gw on c-edge).
* Host-side veth ends: ``eth0`` (nodes, client, gw's leg on c-nodes) and ``eth1`` (gw's
  leg on c-edge). They are created directly inside the host namespace: never in the root
  namespace, not even for an instant.
* Mininet shells: ``bash --norc --noediting -is mininet:<Mininet name>`` (hosts and the two
  bridges; the bridges' shells run in the root namespace).
* OpenFlow ports: on c-nodes node i is port i and gw port 1000; on c-edge gw is port 1 and
  the client port 2. Datapath ids: first 16 hex digits of sha256(bridge name).
* State record: ``<state_dir>/network-c.json``. Lock: ``/run/lock/svclab-net-c.lock``
  (flock held while the network exists; the kernel drops it when the holder dies).

Isolation from the root namespace: the switch-side ends get ``addrgenmode none`` (no IPv6
link-local, so the root namespace sends nothing into the testbed) and ``arp off`` (it never
answers ARP from the testbed) before they come up. With the userspace datapath the root
namespace's stack still *receives* the frames of its ports (OVS taps them with packet
sockets); with no address on them it ignores them. OVS itself adds one shared device,
``ovs-netdev``, for all userspace bridges: it is OVS's, and nothing here touches it.

Crash safety: ``start()`` writes the record (every name it is about to create) before it
creates anything and adds each shell pid as soon as the shell exists. ``clean(name,
state_dir)`` removes everything of one cluster after its creator died (``kill -9``), from
the record and, in any case, by the naming scheme: OVS bridges by exact name (``ovs-vsctl
--if-exists del-br``), Mininet shells by recorded pid only while their argv still is that
shell's, any other process still inside the cluster's namespaces, the netns mounts, then
root-namespace interfaces by exact name. It is idempotent and never uses Mininet's own
cleanup (``mn -c``: deletes every OVS bridge on the machine, kills processes by name).

Mininet hazards, and what this module does about them:

* ``Mininet()`` runs ``Mininet.init()`` -> ``fixLimits()``, which writes root-namespace and
  global sysctls (``net.ipv4.tcp_rmem``/``tcp_wmem`` unconditionally,
  ``net.core.{r,w}mem_max``, ``netdev_max_backlog``, ``neigh.default.gc_thresh*``,
  ``route.max_size``, ``fs.file-max``, ``kernel.pty.max``). We raise only our own process's
  rlimits and mark Mininet initialised, so it never runs.
* Importing ``mininet.log`` calls ``logging.setLoggerClass(MininetLogger)``: every logger
  made later in the process would get its own stderr handler. We restore the class.
* ``ensureRoot()`` and ``OVSSwitch.setup()`` call ``sys.exit(1)``; we check root and ovsdb
  first and raise instead.
* Not used here, and not to be used by callers: ``Mininet.iperf()`` runs ``killall -9
  iperf`` (machine-wide: pids are not namespaced), terms (``makeTerms``/``stopXterms``)
  run ``pkill -9 -f mnexec.*socat``, ``addNAT()``/``nodelib.NAT`` flush the root
  iptables and set its ip_forward, ``LinuxBridge`` sets ``bridge-nf-call-*``,
  ``CPULimitedHost`` mounts cgroups, the default controller writes ``/tmp/c0.log``.
  ``Node.popen(..., shell=True)`` needs ``$SHELL``.
* Left as is (harmless): each switch's ``Intf('lo')`` runs ``ifconfig lo up`` in the root
  namespace (a no-op: lo is up), and ``OVSSwitch.start`` puts ``--if-exists del-br <own
  name>`` before ``add-br`` (own names only; start() refuses when they exist).
* ``Mininet.stop()`` is not used: it costs two shell round trips per link. ``stop()``
  deletes the bridges, hangs up the shells, unmounts the namespaces (the kernel removes
  their veth pairs in one batch) and deletes by name whatever is left.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import hashlib
import ipaddress
import json
import logging
import os
import re
import resource
import signal
import socket
import struct
import subprocess
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger(__name__)

MAX_NAME_LEN = 8
MAX_NODES = 999
NETNS_DIR = Path("/run/netns")
LOCK_DIR = Path("/run/lock")
RECORD_VERSION = 1

#: Which veth ends get ``ethtool -K <dev> tx off`` on a userspace-datapath bridge:
#: "host" = the end inside the host namespace (eth0/eth1), "switch" = the bridge port in
#: the root namespace. Measured on this machine: TCP works with "host" alone and hangs
#: with "switch" alone; the test suite checks TCP node->node and client->node via gw.
TX_OFF_ENDS: tuple[str, ...] = ("host",)

_CLUSTER_NAME = re.compile(r"^[a-z][a-z0-9]{0,%d}$" % (MAX_NAME_LEN - 1))
_SHELL_ARGV = ["bash", "--norc", "--noediting", "-is"]  # + "mininet:<name>"
NODES_OFPORT_GW = 1000
EDGE_OFPORT_GW = 1
EDGE_OFPORT_CLIENT = 2


def validate_cluster_name(name: object) -> str:
    """Return name if it is a valid cluster name, else raise ValueError."""
    if not isinstance(name, str) or not _CLUSTER_NAME.match(name):
        raise ValueError(
            f"invalid cluster name {name!r}: use 1-{MAX_NAME_LEN} characters, lower-case letters "
            "and digits, starting with a letter (no '-': it separates the cluster name in "
            "interface, bridge and netns names)"
        )
    return name


def _network(value: object, what: str) -> ipaddress.IPv4Network:
    try:
        net = ipaddress.ip_network(value, strict=True) if not isinstance(value, ipaddress.IPv4Network) else value
    except (TypeError, ValueError) as exc:
        raise ValueError(f"invalid {what} {value!r}: {exc}") from None
    if not isinstance(net, ipaddress.IPv4Network):
        raise ValueError(f"invalid {what} {value!r}: must be an IPv4 network")
    if net.prefixlen > 30:
        raise ValueError(f"invalid {what} {value!r}: a /{net.prefixlen} is too small (at most /30)")
    return net


@dataclass(frozen=True)
class TopologyConfig:
    """What to build. Subnets may be given as strings; they are stored as IPv4Network."""

    name: str
    nodes: int = 3
    node_subnet: ipaddress.IPv4Network | str = "172.18.0.0/16"
    external_subnet: ipaddress.IPv4Network | str = "203.0.113.0/24"
    #: "user", "kernel" or None (detect: kernel when the openvswitch module is there)
    datapath: str | None = None

    def __post_init__(self) -> None:
        validate_cluster_name(self.name)
        if isinstance(self.nodes, bool) or not isinstance(self.nodes, int) or not 1 <= self.nodes <= MAX_NODES:
            raise ValueError(f"invalid node count {self.nodes!r}: must be 1..{MAX_NODES}")
        node_net = _network(self.node_subnet, "node subnet")
        ext_net = _network(self.external_subnet, "external subnet")
        if node_net.overlaps(ext_net):
            raise ValueError(f"node subnet {node_net} and external subnet {ext_net} overlap")
        # usable hosts: all but network and broadcast; gw takes .1, nodes .2 ..
        if node_net.num_addresses - 2 < self.nodes + 1:
            raise ValueError(f"node subnet {node_net} is too small for a router and {self.nodes} nodes")
        if self.datapath not in (None, "user", "kernel"):
            raise ValueError(f"invalid datapath {self.datapath!r}: 'user', 'kernel' or None")
        object.__setattr__(self, "node_subnet", node_net)
        object.__setattr__(self, "external_subnet", ext_net)

    # addresses -----------------------------------------------------------------------------
    @property
    def node_names(self) -> list[str]:
        return [f"node{i}" for i in range(1, self.nodes + 1)]

    def node_ip(self, index: int) -> str:
        """Address of node ``index`` (1-based): .2, .3, ..."""
        if not 1 <= index <= self.nodes:
            raise IndexError(index)
        return str(self.node_subnet.network_address + 1 + index)

    @property
    def router_node_ip(self) -> str:
        return str(self.node_subnet.network_address + 1)

    @property
    def router_external_ip(self) -> str:
        return str(self.external_subnet.network_address + 1)

    @property
    def client_ip(self) -> str:
        return str(self.external_subnet.network_address + 2)


# --------------------------------------------------------------------------------------------
# Naming scheme


@dataclass(frozen=True)
class Names:
    """Every name one cluster uses; pure functions of the cluster name and node count."""

    cluster: str
    nodes: int

    @property
    def prefix(self) -> str:
        return self.cluster + "-"

    @property
    def hosts(self) -> list[str]:
        """Short host names, as used by the API: node1..nodeN, client, gw."""
        return [f"node{i}" for i in range(1, self.nodes + 1)] + ["client", "gw"]

    def mininet_name(self, host: str) -> str:
        return self.prefix + host

    def netns(self, host: str) -> str:
        return self.prefix + host

    def mount(self, host: str) -> Path:
        return NETNS_DIR / self.netns(host)

    @property
    def nodes_bridge(self) -> str:
        return self.prefix + "nodes"

    @property
    def edge_bridge(self) -> str:
        return self.prefix + "edge"

    @property
    def bridges(self) -> list[str]:
        return [self.nodes_bridge, self.edge_bridge]

    def node_port(self, index: int) -> str:
        return f"{self.prefix}n{index}"

    @property
    def gw_nodes_port(self) -> str:
        return self.prefix + "ngw"

    @property
    def client_port(self) -> str:
        return self.prefix + "ecl"

    @property
    def gw_edge_port(self) -> str:
        return self.prefix + "egw"

    @property
    def ports(self) -> list[str]:
        """Switch-side veth ends (root namespace)."""
        return [self.node_port(i) for i in range(1, self.nodes + 1)] + [
            self.gw_nodes_port,
            self.client_port,
            self.gw_edge_port,
        ]

    def dpid(self, bridge: str) -> str:
        digest = hashlib.sha256(bridge.encode()).hexdigest()[:16]
        return digest if int(digest, 16) else "0000000000000001"

    # patterns for discovery without a record -------------------------------------------------
    @staticmethod
    def bridge_re(cluster: str) -> re.Pattern[str]:
        return re.compile(rf"^{re.escape(cluster)}-(nodes|edge)\Z")

    @staticmethod
    def root_ifname_re(cluster: str) -> re.Pattern[str]:
        return re.compile(rf"^{re.escape(cluster)}-(nodes|edge|n[0-9]+|ngw|ecl|egw)\Z")

    @staticmethod
    def netns_re(cluster: str) -> re.Pattern[str]:
        return re.compile(rf"^{re.escape(cluster)}-(node[0-9]+|client|gw)\Z")

    @staticmethod
    def shell_name_re(cluster: str) -> re.Pattern[str]:
        """Mininet node names of the cluster (hosts and switches)."""
        return re.compile(rf"^{re.escape(cluster)}-(node[0-9]+|client|gw|nodes|edge)\Z")


# --------------------------------------------------------------------------------------------
# Small system helpers (no Mininet needed)

_libc = ctypes.CDLL(None, use_errno=True)
_MNT_DETACH = 2


def _umount_and_remove(path: Path) -> bool:
    """Lazily unmount a netns bind mount and remove the file; True if anything was there."""
    found = False
    # A netns file may carry more than one mount (stacked); unmount until EINVAL.
    for _ in range(8):
        if _libc.umount2(os.fsencode(str(path)), _MNT_DETACH) == 0:
            found = True
            continue
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOENT):
            log.warning("umount %s: %s", path, os.strerror(err))
        break
    try:
        path.unlink()
        found = True
    except FileNotFoundError:
        pass
    return found


def _ns_inode(path: str) -> int | None:
    try:
        return os.stat(path).st_ino
    except OSError:
        return None


def _pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def _cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def _starttime(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    # comm may contain spaces: fields after the last ')'
    return int(stat.rsplit(")", 1)[1].split()[19])


def _is_mininet_shell(pid: int, node_name: str) -> bool:
    """Does pid still run Mininet's shell for node_name?

    Mininet starts ``mnexec -cd[n] env PS1=<DEL> bash --norc --noediting -is mininet:<name>``;
    mnexec and env exec, so the pid shows the bash argv (or, for an instant, one of the
    two launchers in front of it).
    """
    argv = _cmdline(pid)
    tail = _SHELL_ARGV + ["mininet:" + node_name]
    if argv == tail:
        return True
    if argv[-len(tail):] != tail:
        return False
    head = argv[: -len(tail)]
    if head[-2:] == ["env", "PS1=\x7f"]:
        head = head[:-2]
    return head == [] or (len(head) == 2 and head[0] == "mnexec" and re.fullmatch(r"-[a-z]+", head[1]) is not None)


def _mininet_shells(cluster: str) -> dict[str, int]:
    """Running Mininet shells of the cluster found by argv: {mininet node name: pid}."""
    pattern = Names.shell_name_re(cluster)
    found: dict[str, int] = {}
    for pid in _pids():
        argv = _cmdline(pid)
        if len(argv) == 5 and argv[:4] == _SHELL_ARGV and argv[4].startswith("mininet:"):
            name = argv[4][len("mininet:") :]
            if pattern.match(name):
                found[name] = pid
    return found


def _processes_in_netns(inodes: set[int]) -> list[int]:
    me = os.getpid()
    found = []
    for pid in _pids():
        if pid == me:
            continue
        try:
            link = os.readlink(f"/proc/{pid}/ns/net")
        except OSError:
            continue
        m = re.match(r"net:\[(\d+)\]", link)
        if m and int(m.group(1)) in inodes:
            found.append(pid)
    return found


def _kill(pid: int, group: bool = False) -> bool:
    try:
        if group and os.getpgid(pid) == pid:
            os.killpg(pid, signal.SIGKILL)
        else:
            os.kill(pid, signal.SIGKILL)
        return True
    except ProcessLookupError:
        return False
    except PermissionError as exc:
        log.warning("cannot kill %d: %s", pid, exc)
        return False


def _wait_gone(pids: list[int], timeout: float = 2.0) -> None:
    """Wait until the pids are gone or zombies (orphans are reaped by init, not by us)."""
    deadline = time.monotonic() + timeout
    pending = list(pids)
    while pending and time.monotonic() < deadline:
        still = []
        for pid in pending:
            try:
                with open(f"/proc/{pid}/stat") as f:
                    state = f.read().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if state not in ("Z", "X"):
                still.append(pid)
        pending = still
        if pending:
            time.sleep(0.01)


def _root_interfaces() -> set[str]:
    """Interface names in this process's network namespace (netlink, no fork)."""
    return {name for _, name in socket.if_nameindex()}


def _run(argv: list[str], input: str | None = None, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(argv, input=input, capture_output=True, text=True, timeout=timeout)


def _ovs_ok() -> bool:
    try:
        return _run(["ovs-vsctl", "-t", "2", "show"], timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _ovs_bridges() -> list[str] | None:
    try:
        res = _run(["ovs-vsctl", "-t", "5", "list-br"], timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if res.returncode != 0:
        return None
    return res.stdout.split()


def _genl_family_exists(family: str) -> bool:
    """Ask generic netlink whether a family (e.g. ovs_datapath) is registered."""
    NETLINK_GENERIC, GENL_ID_CTRL, CTRL_CMD_GETFAMILY, CTRL_ATTR_FAMILY_NAME = 16, 0x10, 3, 2
    NLM_F_REQUEST, NLMSG_ERROR = 1, 2
    name = family.encode() + b"\0"
    attr = struct.pack("=HH", 4 + len(name), CTRL_ATTR_FAMILY_NAME) + name
    attr += b"\0" * (-len(attr) % 4)
    payload = struct.pack("=BBH", CTRL_CMD_GETFAMILY, 1, 0) + attr
    msg = struct.pack("=IHHII", 16 + len(payload), GENL_ID_CTRL, NLM_F_REQUEST, 1, 0) + payload
    try:
        with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_GENERIC) as sock:
            sock.settimeout(2)
            sock.send(msg)
            data = sock.recv(65536)
    except OSError:
        return False
    _, msg_type, _, _, _ = struct.unpack_from("=IHHII", data)
    if msg_type == NLMSG_ERROR:
        return struct.unpack_from("=i", data, 16)[0] == 0
    return msg_type == GENL_ID_CTRL


def detect_datapath() -> str:
    """'kernel' if the Open vSwitch kernel datapath is available, else 'user'."""
    if Path("/sys/module/openvswitch").exists() or _genl_family_exists("ovs_datapath"):
        return "kernel"
    return "user"


# --------------------------------------------------------------------------------------------
# Leftovers and clean


def lock_path(cluster: str) -> Path:
    """Machine-wide lock of one cluster name, held (flock) while its network exists."""
    return LOCK_DIR / f"svclab-net-{cluster}.lock"


def _try_lock(cluster: str) -> int | None:
    """Take the cluster name's lock without waiting: an fd, or None if someone holds it."""
    LOCK_DIR.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path(cluster), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _release_lock(cluster: str, fd: int) -> None:
    try:
        lock_path(cluster).unlink()
    except FileNotFoundError:
        pass
    os.close(fd)


def record_path(state_dir: Path, cluster: str) -> Path:
    return Path(state_dir) / f"network-{cluster}.json"


@dataclass
class Leftovers:
    """What of one cluster exists on the machine right now (found by name)."""

    bridges: list[str] = field(default_factory=list)
    interfaces: list[str] = field(default_factory=list)  # root namespace
    netns: list[str] = field(default_factory=list)  # names under /run/netns
    shells: dict[str, int] = field(default_factory=dict)  # Mininet node name -> pid

    def __bool__(self) -> bool:
        return bool(self.bridges or self.interfaces or self.netns or self.shells)


def find_leftovers(cluster: str) -> Leftovers:
    """Everything of the cluster found by the naming scheme (no record needed)."""
    validate_cluster_name(cluster)
    bridges = [b for b in (_ovs_bridges() or []) if Names.bridge_re(cluster).match(b)]
    ifre = Names.root_ifname_re(cluster)
    interfaces = sorted(n for n in _root_interfaces() if ifre.match(n))
    nsre = Names.netns_re(cluster)
    try:
        netns = sorted(n for n in os.listdir(NETNS_DIR) if nsre.match(n))
    except FileNotFoundError:
        netns = []
    return Leftovers(sorted(bridges), interfaces, netns, _mininet_shells(cluster))


@dataclass
class CleanResult:
    killed: list[int] = field(default_factory=list)
    bridges: list[str] = field(default_factory=list)
    interfaces: list[str] = field(default_factory=list)
    netns: list[str] = field(default_factory=list)
    record_removed: bool = False


def _load_record(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("unreadable network record %s (%s): cleaning by name only", path, exc)
        return None


def _teardown(
    cluster: str,
    record: dict[str, Any] | None,
    state_file: Path | None,
    terminate: Callable[[], None] | None = None,
) -> CleanResult:
    """Remove every trace of the cluster: what the record names, plus what the naming finds.

    Order: bridges (OVS lets go of the ports), processes (the caller's graceful
    ``terminate`` first, then verified Mininet shells and anything else still inside the
    cluster's namespaces), netns mounts (the namespaces die and the kernel removes their
    veth pairs in one batch), then whatever root-namespace interface is still there, by name.
    """
    result = CleanResult()
    found = find_leftovers(cluster)
    ifre, brre, nsre = Names.root_ifname_re(cluster), Names.bridge_re(cluster), Names.netns_re(cluster)
    shre = Names.shell_name_re(cluster)
    rec = record or {}
    if rec and rec.get("cluster") != cluster:
        log.warning("record %s belongs to cluster %r, not %r: ignored", state_file, rec.get("cluster"), cluster)
        rec = {}

    # Names from the record are only trusted if they fit this cluster's scheme.
    bridges = sorted({b for b in rec.get("bridges", []) if brre.match(b)} | set(found.bridges))
    interfaces = sorted({i for i in rec.get("root_interfaces", []) if ifre.match(i)} | set(found.interfaces))
    netns = sorted({n for n in rec.get("netns", {}).values() if nsre.match(n)} | set(found.netns))

    present = _root_interfaces()
    existed = [i for i in interfaces if i in present]

    # 1. OVS bridges, by exact name
    if bridges:
        argv = ["ovs-vsctl", "-t", "10"]
        for b in bridges:
            argv += ["--", "--if-exists", "del-br", b]
        try:
            res = _run(argv)
            if res.returncode != 0:
                log.warning("ovs-vsctl del-br failed: %s", res.stderr.strip())
            else:
                result.bridges = bridges
        except (OSError, subprocess.TimeoutExpired) as exc:
            log.warning("ovs-vsctl del-br failed: %s", exc)

    # 2. processes
    root_ino = _ns_inode("/proc/self/ns/net")
    inodes = {ino for ino in (_ns_inode(str(NETNS_DIR / n)) for n in netns) if ino is not None}
    shells: dict[int, str] = {}  # pid -> Mininet node name
    for name, info in rec.get("pids", {}).items():
        pid = info.get("pid") if isinstance(info, dict) else None
        if not isinstance(pid, int) or not shre.match(name) or not _is_mininet_shell(pid, name):
            continue  # gone, or the pid now belongs to something else
        started = info.get("starttime")
        if started is not None and _starttime(pid) != started:
            continue
        shells[pid] = name
    for name, pid in found.shells.items():
        shells.setdefault(pid, name)
    for pid in shells:  # host shells' namespaces are ours even without a mount
        ino = _ns_inode(f"/proc/{pid}/ns/net")
        if ino is not None:
            inodes.add(ino)
    inodes.discard(root_ino)  # switch shells run in the root namespace: never sweep that
    if terminate is not None:
        try:
            terminate()
        except Exception as exc:  # best effort: the sweep below catches what is left
            log.warning("terminating Mininet nodes of %s: %s", cluster, exc)
    for pid, name in shells.items():
        # check again: terminate() may have ended (and reaped) it, and pids get reused
        if _is_mininet_shell(pid, name) and _kill(pid, group=True):
            result.killed.append(pid)
    for pid in _processes_in_netns(inodes) if inodes else []:
        if _kill(pid):
            result.killed.append(pid)
    _wait_gone(result.killed)

    # 3. named netns mounts: with no process and no mount left, the namespaces go away
    for n in netns:
        if _umount_and_remove(NETNS_DIR / n):
            result.netns.append(n)

    # 4. root-namespace interfaces: the kernel removes veth pairs with their namespace
    #    (batched, fast); wait a little for that, then delete what is left by exact name.
    present = _root_interfaces()
    doomed = [i for i in interfaces if i in present]
    deadline = time.monotonic() + (2.0 if result.netns else 0.0)
    while doomed and time.monotonic() < deadline:
        time.sleep(0.01)
        present = _root_interfaces()
        doomed = [i for i in doomed if i in present]
    if doomed:
        res = _run(["ip", "-force", "-batch", "-"], input="".join(f"link del dev {i}\n" for i in doomed))
        if res.returncode != 0:
            log.debug("ip link del: %s", res.stderr.strip())
        present = _root_interfaces()
        for i in doomed:
            if i in present:
                log.warning("could not delete interface %s", i)
    present = _root_interfaces()
    result.interfaces = [i for i in existed if i not in present]

    # 5. the record itself
    if state_file is not None:
        try:
            state_file.unlink()
            result.record_removed = True
        except FileNotFoundError:
            pass
    return result


def clean(cluster_name: str, state_dir: Path) -> CleanResult:
    """Remove everything the cluster's network left behind (after kill -9, or any time).

    Uses the record in state_dir when there is one and, in any case, finds leftovers by
    the cluster's naming scheme. Touches nothing of another cluster. Idempotent.
    """
    validate_cluster_name(cluster_name)
    state_file = record_path(Path(state_dir), cluster_name)
    fd = _try_lock(cluster_name)
    if fd is None:
        log.warning("cluster %s: its creating process still holds %s (hung?); cleaning anyway",
                    cluster_name, lock_path(cluster_name))
    try:
        result = _teardown(cluster_name, _load_record(state_file), state_file)
    finally:
        if fd is not None:
            _release_lock(cluster_name, fd)
    if result.killed or result.bridges or result.interfaces or result.netns:
        log.info(
            "cleaned cluster %s: killed %s, bridges %s, interfaces %s, netns %s",
            cluster_name, result.killed, result.bridges, result.interfaces, result.netns,
        )
    return result


# --------------------------------------------------------------------------------------------
# Mininet glue

_mininet: dict[str, Any] = {}


def _mininet_classes() -> dict[str, Any]:
    """Import Debian's Mininet without its process- and machine-wide side effects."""
    if _mininet:
        return _mininet
    logger_class = logging.getLoggerClass()
    try:
        from mininet.link import Link
        from mininet.net import Mininet
        from mininet.node import Host, OVSSwitch
    finally:
        logging.setLoggerClass(logger_class)  # mininet.log sets MininetLogger process-wide

    if not Mininet.inited:
        # Mininet.init() = ensureRoot() + fixLimits(); the latter writes root-namespace and
        # global sysctls. Raise only this process's rlimits (ptys and pipes per host).
        for limit, want in ((resource.RLIMIT_NOFILE, 16384), (resource.RLIMIT_NPROC, 8192)):
            soft, hard = resource.getrlimit(limit)
            if soft != resource.RLIM_INFINITY and soft < want:
                new_hard = hard if hard == resource.RLIM_INFINITY or hard >= want else want
                try:
                    resource.setrlimit(limit, (want, new_hard))
                except (ValueError, OSError):
                    pass
        Mininet.inited = True

    class RootPortLink(Link):
        """A veth whose first end is a bridge port in the root namespace.

        Both ends are created where they live (never a host-side name in the root
        namespace); the root end gets no IPv6 link-local and no ARP before it is up.
        """

        @classmethod
        def makeIntfPair(cls, intfname1, intfname2, addr1=None, addr2=None, node1=None, node2=None,
                         deleteIntfs=True):  # noqa: N802 (Mininet's API)
            assert node1 is not None and node2 is not None and not node1.inNamespace
            out = node1.cmd(
                f"ip link add name {intfname1} address {addr1} type veth peer name {intfname2} "
                f"address {addr2} netns {node2.pid} && ip link set dev {intfname1} addrgenmode none arp off up"
            )
            if out.strip():
                raise RuntimeError(f"creating veth {intfname1}/{intfname2} failed: {out.strip()}")

    _mininet.update(Mininet=Mininet, Host=Host, OVSSwitch=OVSSwitch, Link=RootPortLink)
    return _mininet


# --------------------------------------------------------------------------------------------


class ClusterExistsError(RuntimeError):
    """Resources of a cluster with this name already exist."""


class ClusterNetwork:
    """One cluster's network. ``start()`` builds it, ``stop()`` removes all of it."""

    def __init__(self, config: TopologyConfig, state_dir: Path) -> None:
        self.config = config
        self.state_dir = Path(state_dir)
        self.names = Names(config.name, config.nodes)
        self._net = None
        self._hosts: dict[str, Any] = {}
        self._switches: dict[str, Any] = {}
        self._record: dict[str, Any] | None = None
        self._datapath: str | None = None
        self._lock_fd: int | None = None
        self.timings: dict[str, float] = {}

    # ---- description ----------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.config.name

    @property
    def state_file(self) -> Path:
        return record_path(self.state_dir, self.config.name)

    @property
    def running(self) -> bool:
        return self._net is not None

    @property
    def datapath(self) -> str | None:
        """'user' or 'kernel' once started."""
        return self._datapath

    @property
    def node_names(self) -> list[str]:
        return self.config.node_names

    @property
    def host_names(self) -> list[str]:
        return self.names.hosts

    @property
    def node_ips(self) -> dict[str, str]:
        return {f"node{i}": self.config.node_ip(i) for i in range(1, self.config.nodes + 1)}

    def node_ip(self, node: str) -> str:
        return self.node_ips[node]

    @property
    def client_ip(self) -> str:
        return self.config.client_ip

    @property
    def router_node_ip(self) -> str:
        return self.config.router_node_ip

    @property
    def router_external_ip(self) -> str:
        return self.config.router_external_ip

    @property
    def netns_names(self) -> dict[str, str]:
        return {h: self.names.netns(h) for h in self.names.hosts}

    def netns(self, host: str) -> str:
        """Named netns of a host ('node1', 'client', 'gw'): usable with ip netns exec."""
        self._check_host(host)
        return self.names.netns(host)

    @property
    def bridges(self) -> dict[str, str]:
        return {"nodes": self.names.nodes_bridge, "edge": self.names.edge_bridge}

    @property
    def dpids(self) -> dict[str, str]:
        return {b: self.names.dpid(b) for b in self.names.bridges}

    @property
    def root_interfaces(self) -> list[str]:
        """Switch-side veth ends in the root namespace."""
        return self.names.ports

    def host(self, name: str):
        """The Mininet host ('node1'.., 'client', 'gw'; the Mininet name works too)."""
        if self._net is None:
            raise RuntimeError(f"cluster network {self.name} is not running")
        short = name[len(self.names.prefix) :] if name.startswith(self.names.prefix) else name
        self._check_host(short)
        return self._hosts[short]

    @property
    def mininet(self):
        """The Mininet object, for Mininet's CLI."""
        if self._net is None:
            raise RuntimeError(f"cluster network {self.name} is not running")
        return self._net

    def _check_host(self, host: str) -> None:
        if host not in self.names.hosts:
            raise KeyError(f"no host {host!r} in cluster {self.name} (hosts: {', '.join(self.names.hosts)})")

    # ---- record ----------------------------------------------------------------------------
    def _save_record(self) -> None:
        assert self._record is not None
        tmp = self.state_file.with_name(self.state_file.name + ".tmp")
        tmp.write_text(json.dumps(self._record, indent=1, sort_keys=True))
        os.replace(tmp, self.state_file)

    def _record_pid(self, node: Any) -> None:
        assert self._record is not None
        self._record["pids"][node.name] = {"pid": node.pid, "starttime": _starttime(node.pid)}
        self._save_record()

    # ---- lifecycle -------------------------------------------------------------------------
    def __enter__(self) -> "ClusterNetwork":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> "ClusterNetwork":
        if self._net is not None:
            raise RuntimeError(f"cluster network {self.name} is already running")
        t0 = time.monotonic()
        if os.geteuid() != 0:
            raise PermissionError("building a cluster network needs root")
        if not _ovs_ok():
            raise RuntimeError(
                "Open vSwitch is not running (ovs-vsctl show fails); start it with "
                "/usr/share/openvswitch/scripts/ovs-ctl start --system-id=random"
            )
        # The lock makes the check below race-free against another start() of the same name
        # (whose resources a rollback here would otherwise tear down); the kernel drops it
        # when the holder dies, kill -9 included.
        fd = _try_lock(self.name)
        if fd is None:
            raise ClusterExistsError(
                f"cluster network {self.name!r} is running in another process ({lock_path(self.name)} is locked)"
            )
        leftovers = find_leftovers(self.name)
        if leftovers or self.state_file.exists():
            os.close(fd)
            raise ClusterExistsError(
                f"cluster network {self.name!r} already exists or left debris ({leftovers}, record "
                f"{self.state_file} {'present' if self.state_file.exists() else 'absent'}); "
                f"run clean({self.name!r}, state_dir) if it is dead"
            )
        self._lock_fd = fd
        try:
            datapath = self.config.datapath or detect_datapath()
            self.state_dir.mkdir(parents=True, exist_ok=True)
            n = self.names
            self._record = {
                "version": RECORD_VERSION,
                "cluster": self.name,
                "state": "starting",
                "creator_pid": os.getpid(),
                "created": time.time(),
                "datapath": datapath,
                "nodes": self.config.nodes,
                "node_subnet": str(self.config.node_subnet),
                "external_subnet": str(self.config.external_subnet),
                "bridges": n.bridges,
                "root_interfaces": n.ports + n.bridges,
                "netns": {h: n.netns(h) for h in n.hosts},
                "mounts": [str(n.mount(h)) for h in n.hosts],
                "lock": str(lock_path(self.name)),
                "pids": {},
            }
            self._save_record()  # before anything exists
            self._build(datapath)
        except BaseException:
            log.exception("starting cluster network %s failed; tearing down", self.name)
            self._teardown_all()  # we hold the name's lock and found no debris: all of it is ours
            raise
        self._datapath = datapath
        self._record["state"] = "running"
        self._save_record()
        self.timings["start"] = time.monotonic() - t0
        return self

    def _build(self, datapath: str) -> None:
        mn = _mininet_classes()
        cfg, n = self.config, self.names
        net = mn["Mininet"](
            topo=None, switch=mn["OVSSwitch"], host=mn["Host"], controller=None, link=mn["Link"],
            build=False, autoSetMacs=False, ipBase=str(cfg.node_subnet),
        )
        self._net = net
        for h in n.hosts:
            host = net.addHost(n.mininet_name(h), ip=None)
            self._hosts[h] = host
            self._record_pid(host)
        for bridge in n.bridges:
            sw = net.addSwitch(
                bridge, cls=mn["OVSSwitch"], failMode="standalone", datapath=datapath,
                dpid=n.dpid(bridge), inband=False, stp=False,
            )
            self._switches[bridge] = sw
            self._record_pid(sw)
        # named netns first: from now on other processes can enter the hosts by name
        lines = "".join(f"netns attach {n.netns(h)} {host.pid}\n" for h, host in self._hosts.items())
        res = _run(["ip", "-batch", "-"], input=lines)
        if res.returncode != 0:
            raise RuntimeError(f"ip netns attach failed: {res.stderr.strip()}")

        nodes_sw, edge_sw = self._switches[n.nodes_bridge], self._switches[n.edge_bridge]
        # up=None: no "ifconfig <dev> up" round trip per end; the root end comes up in
        # makeIntfPair, the host end with its address below.
        quiet = {"params1": {"up": None}, "params2": {"up": None}}
        for i in range(1, cfg.nodes + 1):
            net.addLink(nodes_sw, self._hosts[f"node{i}"], port1=i, intfName1=n.node_port(i), intfName2="eth0",
                        **quiet)
        gw = self._hosts["gw"]
        net.addLink(nodes_sw, gw, port1=NODES_OFPORT_GW, intfName1=n.gw_nodes_port, intfName2="eth0", **quiet)
        net.addLink(edge_sw, gw, port1=EDGE_OFPORT_GW, intfName1=n.gw_edge_port, intfName2="eth1", **quiet)
        net.addLink(edge_sw, self._hosts["client"], port1=EDGE_OFPORT_CLIENT, intfName1=n.client_port,
                    intfName2="eth0", **quiet)
        # Mininet's build() would only run "ifconfig lo up" per host (configHosts); the
        # host scripts below do that, so skip the extra round trip per host.
        net.built = True

        tx_off = datapath == "user"
        node_plen, ext_plen = cfg.node_subnet.prefixlen, cfg.external_subnet.prefixlen
        plan: list[tuple[str, list[tuple[str, str, int]], list[str]]] = []
        for i in range(1, cfg.nodes + 1):
            plan.append((f"node{i}", [("eth0", cfg.node_ip(i), node_plen)],
                         [f"ip route add {cfg.external_subnet} via {cfg.router_node_ip} dev eth0"]))
        plan.append(("client", [("eth0", cfg.client_ip, ext_plen)],
                     [f"ip route add {cfg.node_subnet} via {cfg.router_external_ip} dev eth0"]))
        plan.append(("gw", [("eth0", cfg.router_node_ip, node_plen), ("eth1", cfg.router_external_ip, ext_plen)],
                     ["echo 1 > /proc/sys/net/ipv4/ip_forward"]))
        for h, addrs, extra in plan:
            host = self._hosts[h]
            cmds = ["ip link set dev lo up"]
            for dev, ip, plen in addrs:
                cmds.append(f"ip addr add {ip}/{plen} dev {dev}")
                cmds.append(f"ip link set dev {dev} up")
                if tx_off and "host" in TX_OFF_ENDS:
                    cmds.append(f"ethtool -K {dev} tx off >/dev/null")
            cmds += extra
            script = " && ".join(cmds) + " && echo __ok__"
            out = host.cmd(script)
            if "__ok__" not in out:
                raise RuntimeError(f"configuring {h} failed: {out.strip()}")
            for dev, ip, plen in addrs:
                intf = host.intf(dev)
                intf.ip, intf.prefixLen = ip, plen  # Mininet's bookkeeping (host.IP())
        if tx_off and "switch" in TX_OFF_ENDS:
            script = " && ".join(f"ethtool -K {p} tx off >/dev/null" for p in n.ports) + " && echo __ok__"
            out = nodes_sw.cmd(script)
            if "__ok__" not in out:
                raise RuntimeError(f"ethtool on bridge ports failed: {out.strip()}")
        with warnings.catch_warnings():  # Mininet compares OVS versions with distutils
            warnings.simplefilter("ignore", DeprecationWarning)
            net.start()  # ovs-vsctl add-br + ports, one transaction per bridge

    def stop(self) -> None:
        """Tear down everything start() made; safe to call more than once."""
        if self._net is None and self._record is None:
            return
        t0 = time.monotonic()
        if self._record is not None:
            self._record["state"] = "stopping"
            try:
                self._save_record()
            except OSError:
                pass
        self._teardown_all()
        self.timings["stop"] = time.monotonic() - t0

    def _teardown_all(self) -> None:
        net, self._net = self._net, None

        def terminate() -> None:
            # Mininet's own stop() costs two shell round trips per link; removing the
            # bridges and the namespaces removes the links at once. Here we only hang up
            # the shells (and reap them: they are our children).
            for node in list(net.hosts) + list(net.switches):
                try:
                    node.terminate()
                except Exception as exc:
                    log.warning("terminating %s: %s", node.name, exc)

        self._hosts.clear()
        self._switches.clear()
        try:
            _teardown(self.name, self._record, self.state_file, terminate if net is not None else None)
        finally:
            self._record = None
            self._datapath = None
            if self._lock_fd is not None:
                _release_lock(self.name, self._lock_fd)
                self._lock_fd = None
