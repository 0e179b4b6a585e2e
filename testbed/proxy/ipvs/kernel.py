"""IPVS, kube-ipvs0 and ipsets over netlink (pyroute2), in the calling thread's namespace.

Sockets are opened per call batch (`Netlink()` as a context manager), in the namespace of the
thread that opens them: kube-proxy runs inside its node's namespace, tests enter one.
"""

from __future__ import annotations

import errno
import socket
from pathlib import Path
from typing import Iterable, NamedTuple

from pyroute2 import IPVS, IPRoute, IPSet, IPVSDest, IPVSService
from pyroute2.ipset import PortEntry
from pyroute2.netlink.exceptions import NetlinkError

from testbed.proxy import kernel
from testbed.proxy.ipvs import names
from testbed.proxy.ipvs.desired import SetEntry, VirtualServer, VirtualService

PROTOCOLS = {"TCP": socket.IPPROTO_TCP, "UDP": socket.IPPROTO_UDP, "SCTP": 132}
PROTOCOL_NAMES = {v: k for k, v in PROTOCOLS.items()}
IP_VS_CONN_F_MASQ = 0  # forwarding method: NAT (kube-proxy's), pyroute2's default is direct routing
SYSCTLS = {  # as upstream's NewProxier; per network namespace
    "net/ipv4/vs/conntrack": "1",  # so that iptables can masquerade what IPVS DNATs
    "net/ipv4/vs/expire_nodest_conn": "1",
    "net/ipv4/vs/expire_quiescent_template": "1",
    "net/ipv4/ip_forward": "1",
}


class RealServer(NamedTuple):
    addr: str  # "ip:port"
    weight: int
    active: int
    inactive: int


def failed(what: str, exc: NetlinkError) -> kernel.RulesFailed:
    return kernel.RulesFailed(["ipvs", *what.split()], exc.code, f"{what}: {exc}")


def ensure_sysctls() -> None:
    """Set IPVS mode's sysctls, only ever inside a namespace other than the machine's own."""
    here = Path("/proc/thread-self/ns/net").stat().st_ino
    if here == Path("/proc/1/ns/net").stat().st_ino:
        raise RuntimeError("ipvs: refusing to set sysctls in the root network namespace")
    for key, value in SYSCTLS.items():
        path = Path("/proc/sys") / key
        if path.read_text().strip() != value:
            path.write_text(value)


def _service_attrs(vs: VirtualServer) -> dict:
    return dict(addr=vs.address, port=vs.port, protocol=PROTOCOLS[vs.protocol])


def _service(v: VirtualService) -> IPVSService:
    flags = names.IP_VS_SVC_F_PERSISTENT if v.persistence else 0
    return IPVSService(**_service_attrs(v.key), sched_name=v.scheduler, timeout=v.persistence,
                       flags={"flags": flags, "mask": 0xFFFFFFFF})


def _dest(addr: str, weight: int) -> IPVSDest:
    ip, port = addr.rsplit(":", 1)
    return IPVSDest(addr=ip, port=int(port), weight=weight, fwd_method=IP_VS_CONN_F_MASQ)


class Netlink:
    """One batch of netlink calls: IPVS, links and ipsets (each socket opened at first use, so
    that the ipset and link calls also work where the kernel has no IPVS)."""

    def __enter__(self) -> Netlink:
        self._sockets: dict[type, object] = {}
        return self

    def __exit__(self, *exc) -> None:
        for sock in self._sockets.values():
            sock.close()

    def _socket(self, kind: type):
        if kind not in self._sockets:
            self._sockets[kind] = kind()
        return self._sockets[kind]

    @property
    def ipvs(self) -> IPVS:
        return self._socket(IPVS)

    @property
    def ipr(self) -> IPRoute:
        return self._socket(IPRoute)

    @property
    def ipset(self) -> IPSet:
        return self._socket(IPSet)

    # ---------------------------------------------------------------- IPVS

    def services(self) -> dict[VirtualServer, tuple[str, int]]:
        """Every virtual service: key -> (scheduler, persistence timeout)."""
        out = {}
        for msg in self.ipvs.service("dump"):
            svc = msg.get_attr("IPVS_CMD_ATTR_SERVICE")
            if svc.get_attr("IPVS_SVC_ATTR_FWMARK"):
                continue
            key = VirtualServer(PROTOCOL_NAMES.get(svc.get_attr("IPVS_SVC_ATTR_PROTOCOL"), "?"),
                                svc.get_attr("IPVS_SVC_ATTR_ADDR"), svc.get_attr("IPVS_SVC_ATTR_PORT"))
            persistent = svc.get_attr("IPVS_SVC_ATTR_FLAGS")["flags"] & names.IP_VS_SVC_F_PERSISTENT
            out[key] = (svc.get_attr("IPVS_SVC_ATTR_SCHED_NAME"),
                        svc.get_attr("IPVS_SVC_ATTR_TIMEOUT") if persistent else 0)
        return out

    def has_ipvs(self) -> bool:
        """The kernel has IPVS (in this namespace)."""
        return Path("/proc/net/ip_vs").exists()

    def has_service(self, vs: VirtualServer) -> bool:
        try:
            self.ipvs.service("get", service=IPVSService(**_service_attrs(vs)))
        except NetlinkError as exc:
            if exc.code in (errno.ESRCH, errno.ENOENT):
                return False
            raise
        return True

    def real_servers(self, vs: VirtualServer) -> dict[str, RealServer]:
        out = {}
        for msg in self.ipvs.dest("dump", service=IPVSService(**_service_attrs(vs))):
            d = msg.get_attr("IPVS_CMD_ATTR_DEST")
            addr = f"{d.get_attr('IPVS_DEST_ATTR_ADDR')}:{d.get_attr('IPVS_DEST_ATTR_PORT')}"
            out[addr] = RealServer(addr, d.get_attr("IPVS_DEST_ATTR_WEIGHT"),
                                   d.get_attr("IPVS_DEST_ATTR_ACTIVE_CONNS") or 0,
                                   d.get_attr("IPVS_DEST_ATTR_INACT_CONNS") or 0)
        return out

    def put_service(self, v: VirtualService, exists: bool) -> None:
        try:
            self.ipvs.service("set" if exists else "add", service=_service(v))
        except NetlinkError as exc:
            raise failed(f"{'set' if exists else 'add'} service {v.key} scheduler {v.scheduler}", exc) from None

    def delete_service(self, vs: VirtualServer) -> None:
        try:
            self.ipvs.service("del", service=IPVSService(**_service_attrs(vs)))
        except NetlinkError as exc:
            if exc.code not in (errno.ESRCH, errno.ENOENT):
                raise failed(f"del service {vs}", exc) from None

    def put_dest(self, vs: VirtualServer, addr: str, weight: int, exists: bool) -> None:
        try:
            self.ipvs.dest("set" if exists else "add", service=IPVSService(**_service_attrs(vs)),
                           dest=_dest(addr, weight))
        except NetlinkError as exc:
            if not exists and exc.code == errno.EEXIST:
                return self.put_dest(vs, addr, weight, True)
            raise failed(f"{'set' if exists else 'add'} real server {addr} of {vs}", exc) from None

    def delete_dest(self, vs: VirtualServer, addr: str) -> None:
        try:
            self.ipvs.dest("del", service=IPVSService(**_service_attrs(vs)), dest=_dest(addr, 0))
        except NetlinkError as exc:
            if exc.code not in (errno.ESRCH, errno.ENOENT):
                raise failed(f"del real server {addr} of {vs}", exc) from None

    def flush_ipvs(self) -> None:
        for vs in self.services():
            self.delete_service(vs)

    # ---------------------------------------------------------------- kube-ipvs0

    def dummy_index(self) -> int | None:
        found = self.ipr.link_lookup(ifname=names.DUMMY_DEVICE)
        return found[0] if found else None

    def ensure_dummy(self) -> int:
        index = self.dummy_index()
        if index is None:
            self.ipr.link("add", ifname=names.DUMMY_DEVICE, kind="dummy")
            index = self.dummy_index()
        return index

    def bound(self, index: int) -> set[str]:
        return {a.get_attr("IFA_ADDRESS") for a in self.ipr.get_addr(family=socket.AF_INET, index=index)}

    def bind(self, index: int, address: str) -> None:
        try:
            self.ipr.addr("add", index=index, address=address, prefixlen=32)
        except NetlinkError as exc:
            if exc.code != errno.EEXIST:
                raise failed(f"bind {address} to {names.DUMMY_DEVICE}", exc) from None

    def unbind(self, index: int, address: str) -> None:
        try:
            self.ipr.addr("del", index=index, address=address, prefixlen=32)
        except NetlinkError as exc:
            if exc.code not in (errno.EADDRNOTAVAIL, errno.ENOENT, errno.ESRCH):
                raise failed(f"unbind {address} from {names.DUMMY_DEVICE}", exc) from None

    def delete_dummy(self) -> None:
        index = self.dummy_index()
        if index is not None:
            self.ipr.link("del", index=index)

    def node_addresses(self) -> tuple[str, ...]:
        """Every IPv4 address of the namespace but loopback and kube-ipvs0's (the NodePort addresses
        when --nodeport-addresses is not given)."""
        dummy = self.dummy_index()
        out = {a.get_attr("IFA_ADDRESS") for a in self.ipr.get_addr(family=socket.AF_INET)
               if a["index"] != dummy and not a.get_attr("IFA_ADDRESS", "").startswith("127.")}
        return tuple(sorted(out))

    # ---------------------------------------------------------------- ipsets

    def ensure_sets(self) -> None:
        for spec in names.SETS:
            extra = {"bitmap_ports_range": (0, 65535)} if spec.kind == "bitmap:port" else {}
            try:
                self.ipset.create(spec.name, stype=spec.kind, exclusive=False, **extra)
            except NetlinkError as exc:
                raise failed(f"create ipset {spec.name} {spec.kind}", exc) from None

    def has_set(self, name: str) -> bool:
        try:
            list(self.ipset.headers(name))  # a generator (pyroute2 0.9): the request runs when it is read
        except NetlinkError:
            return False
        return True

    def set_members(self, name: str) -> set[tuple]:
        """The members of one of our sets, as desired.SetEntry fields."""
        members: set[tuple] = set()
        for msg in self.ipset.list(name):
            adt = msg.get_attr("IPSET_ATTR_ADT")
            for data in (adt.get_attrs("IPSET_ATTR_DATA") if adt else ()):
                members.add(_entry_fields(names.SET_KINDS[name], data))
        return members

    def add_entry(self, entry: SetEntry) -> None:
        self._entry("add", entry)

    def delete_entry(self, entry: SetEntry) -> None:
        self._entry("delete", entry)

    def _entry(self, verb: str, entry: SetEntry) -> None:
        name, fields = entry
        kind = names.SET_KINDS[name]
        etype = kind.split(":", 1)[1]
        if kind == "bitmap:port":
            value: object = fields[0]
        else:
            value = [fields[0], PortEntry(fields[2], protocol=PROTOCOLS[fields[1].upper()]), *fields[3:]] \
                if "port" in etype else [fields[0]]
        try:
            if verb == "add":
                self.ipset.add(name, value, etype=etype, exclusive=False)
            else:
                self.ipset.delete(name, value, etype=etype, exclusive=False)
        except NetlinkError as exc:
            if verb == "delete" and exc.code in (errno.ENOENT, errno.ESRCH) or exc.code == 4103:  # IPSET_ERR_EXIST
                return
            raise failed(f"{verb} {fields} in ipset {name}", exc) from None

    def destroy_sets(self) -> None:
        for spec in names.SETS:
            try:
                self.ipset.destroy(spec.name)
            except NetlinkError:
                pass


def _entry_fields(kind: str, data) -> tuple:
    """An ipset list message's member back to desired.SetEntry fields."""
    def ip(attr: str) -> str | None:
        nested = data.get_attr(attr)
        return nested.get_attr("IPSET_ATTR_IPADDR_IPV4") if nested else None

    port = data.get_attr("IPSET_ATTR_PORT_FROM") or data.get_attr("IPSET_ATTR_PORT")
    if kind == "bitmap:port":
        return (port,)
    first = ip("IPSET_ATTR_IP_FROM") or ip("IPSET_ATTR_IP")
    if kind == "hash:ip":
        return (first,)
    proto = PROTOCOL_NAMES.get(data.get_attr("IPSET_ATTR_PROTO"), "?").lower()
    if kind == "hash:ip,port":
        return (first, proto, port)
    if kind == "hash:ip,port,net":
        return (first, proto, port, f"{ip('IPSET_ATTR_IP2')}/{data.get_attr('IPSET_ATTR_CIDR2')}")
    return (first, proto, port, ip("IPSET_ATTR_IP2"))


def members_by_set(entries: Iterable[SetEntry]) -> dict[str, set[tuple]]:
    out: dict[str, set[tuple]] = {spec.name: set() for spec in names.SETS}
    for name, fields in entries:
        out[name].add(fields)
    return out
