"""Building one cluster's network with Mininet on Open vSwitch (the layout and names: topo.py).

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

Mininet is imported and used through mininet_glue.py (which says what of Mininet is
avoided and why); what a dead cluster left is removed by netclean.py.
"""

from __future__ import annotations

import json
import logging
import os
import time
import warnings
from pathlib import Path
from typing import Any

from testbed.cluster import procfs
from testbed.cluster.mininet_glue import mininet_classes
from testbed.cluster.netclean import (
    find_leftovers, lock_path, record_path, release_lock, teardown, try_lock,
)
from testbed.cluster.ovs import detect_datapath, ovs_ok, run
from testbed.cluster.topo import (
    EDGE_OFPORT_CLIENT, EDGE_OFPORT_GW, NODES_OFPORT_GW, Names, TopologyConfig,
)

log = logging.getLogger(__name__)

RECORD_VERSION = 1

#: Which veth ends get ``ethtool -K <dev> tx off`` on a userspace-datapath bridge:
#: "host" = the end inside the host namespace (eth0/eth1), "switch" = the bridge port in
#: the root namespace. Measured on this machine: TCP works with "host" alone and hangs
#: with "switch" alone; the test suite checks TCP node->node and client->node via gw.
TX_OFF_ENDS: tuple[str, ...] = ("host",)


class MachineNotReady(RuntimeError):
    """This machine cannot build a cluster network now (not root, Open vSwitch not running)."""


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
        self._record["pids"][node.name] = {"pid": node.pid, "starttime": procfs.starttime(node.pid)}
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
        self._check_machine()
        self._lock_fd = self._claim_name()
        try:
            datapath = self.config.datapath or detect_datapath()
            self.state_dir.mkdir(parents=True, exist_ok=True)
            self._record = self._new_record(datapath)
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

    @staticmethod
    def _check_machine() -> None:
        if os.geteuid() != 0:
            raise MachineNotReady("building a cluster network needs root")
        if not ovs_ok():
            raise MachineNotReady(
                "Open vSwitch is not running (ovs-vsctl show fails); start it with `make setup` "
                "(or /usr/share/openvswitch/scripts/ovs-ctl start --system-id=random)"
            )

    def _claim_name(self) -> int:
        """The name's lock, once nothing of this name exists. The lock makes the check race-free
        against another start() of the same name (whose resources a rollback here would otherwise
        tear down); the kernel drops it when the holder dies, kill -9 included."""
        fd = try_lock(self.name)
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
        return fd

    def _new_record(self, datapath: str) -> dict[str, Any]:
        """Every name start() is about to create, for clean() after a crash."""
        n = self.names
        return {
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

    def _build(self, datapath: str) -> None:
        mn = mininet_classes()
        net = mn["Mininet"](
            topo=None, switch=mn["OVSSwitch"], host=mn["Host"], controller=None, link=mn["Link"],
            build=False, autoSetMacs=False, ipBase=str(self.config.node_subnet),
        )
        self._net = net
        self._add_nodes(net, mn["OVSSwitch"], datapath)
        self._add_links(net)
        # Mininet's build() would only run "ifconfig lo up" per host (configHosts); the
        # host scripts below do that, so skip the extra round trip per host.
        net.built = True
        self._configure_hosts(tx_off=datapath == "user" and "host" in TX_OFF_ENDS)
        if datapath == "user" and "switch" in TX_OFF_ENDS:
            script = " && ".join(f"ethtool -K {p} tx off >/dev/null" for p in self.names.ports) + " && echo __ok__"
            out = self._switches[self.names.nodes_bridge].cmd(script)
            if "__ok__" not in out:
                raise RuntimeError(f"ethtool on bridge ports failed: {out.strip()}")
        with warnings.catch_warnings():  # Mininet compares OVS versions with distutils
            warnings.simplefilter("ignore", DeprecationWarning)
            net.start()  # ovs-vsctl add-br + ports, one transaction per bridge

    def _add_nodes(self, net: Any, switch_class: Any, datapath: str) -> None:
        """Hosts and switches (their shells start here), then the named netns of the hosts."""
        n = self.names
        for h in n.hosts:
            host = net.addHost(n.mininet_name(h), ip=None)
            self._hosts[h] = host
            self._record_pid(host)
        for bridge in n.bridges:
            sw = net.addSwitch(
                bridge, cls=switch_class, failMode="standalone", datapath=datapath,
                dpid=n.dpid(bridge), inband=False, stp=False,
            )
            self._switches[bridge] = sw
            self._record_pid(sw)
        # named netns first: from now on other processes can enter the hosts by name
        lines = "".join(f"netns attach {n.netns(h)} {host.pid}\n" for h, host in self._hosts.items())
        res = run(["ip", "-batch", "-"], input=lines)
        if res.returncode != 0:
            raise RuntimeError(f"ip netns attach failed: {res.stderr.strip()}")

    def _add_links(self, net: Any) -> None:
        n = self.names
        nodes_sw, edge_sw = self._switches[n.nodes_bridge], self._switches[n.edge_bridge]
        # up=None: no "ifconfig <dev> up" round trip per end; the root end comes up in
        # makeIntfPair, the host end with its address in _configure_hosts.
        quiet = {"params1": {"up": None}, "params2": {"up": None}}
        for i in range(1, self.config.nodes + 1):
            net.addLink(nodes_sw, self._hosts[f"node{i}"], port1=i, intfName1=n.node_port(i), intfName2="eth0",
                        **quiet)
        gw = self._hosts["gw"]
        net.addLink(nodes_sw, gw, port1=NODES_OFPORT_GW, intfName1=n.gw_nodes_port, intfName2="eth0", **quiet)
        net.addLink(edge_sw, gw, port1=EDGE_OFPORT_GW, intfName1=n.gw_edge_port, intfName2="eth1", **quiet)
        net.addLink(edge_sw, self._hosts["client"], port1=EDGE_OFPORT_CLIENT, intfName1=n.client_port,
                    intfName2="eth0", **quiet)

    def _address_plan(self) -> list[tuple[str, list[tuple[str, str, int]], list[str]]]:
        """Per host: (host, [(device, address, prefix length)], extra commands)."""
        cfg = self.config
        node_plen, ext_plen = cfg.node_subnet.prefixlen, cfg.external_subnet.prefixlen
        plan: list[tuple[str, list[tuple[str, str, int]], list[str]]] = []
        for i in range(1, cfg.nodes + 1):
            plan.append((f"node{i}", [("eth0", cfg.node_ip(i), node_plen)],
                         [f"ip route add {cfg.external_subnet} via {cfg.router_node_ip} dev eth0"]))
        plan.append(("client", [("eth0", cfg.client_ip, ext_plen)],
                     [f"ip route add {cfg.node_subnet} via {cfg.router_external_ip} dev eth0"]))
        plan.append(("gw", [("eth0", cfg.router_node_ip, node_plen), ("eth1", cfg.router_external_ip, ext_plen)],
                     ["echo 1 > /proc/sys/net/ipv4/ip_forward"]))
        return plan

    def _configure_hosts(self, tx_off: bool) -> None:
        """Addresses, routes and forwarding: one shell round trip per host."""
        for h, addrs, extra in self._address_plan():
            host = self._hosts[h]
            cmds = ["ip link set dev lo up"]
            for dev, ip, plen in addrs:
                cmds.append(f"ip addr add {ip}/{plen} dev {dev}")
                cmds.append(f"ip link set dev {dev} up")
                if tx_off:
                    cmds.append(f"ethtool -K {dev} tx off >/dev/null")
            cmds += extra
            out = host.cmd(" && ".join(cmds) + " && echo __ok__")
            if "__ok__" not in out:
                raise RuntimeError(f"configuring {h} failed: {out.strip()}")
            for dev, ip, plen in addrs:
                intf = host.intf(dev)
                intf.ip, intf.prefixLen = ip, plen  # Mininet's bookkeeping (host.IP())

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
            teardown(self.name, self._record, self.state_file, terminate if net is not None else None)
        finally:
            self._record = None
            self._datapath = None
            if self._lock_fd is not None:
                release_lock(self.name, self._lock_fd)
                self._lock_fd = None
